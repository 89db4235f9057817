"""A model served by Triton Inference Server, behind the same ``Engine`` interface:
``grpc://host:8001/<name>`` or ``http://host:8000/<name>`` wherever a model file is accepted.

Geometry, threshold and the rest of the metadata come from the served model's config parameters
(written by ``triton-repo`` and ``serve``). Every call has a bounded timeout. A server that goes away
makes frames fail (``EngineUnavailable``: the caller counts the frame failed and goes on), never the
process; after a failure the engine waits a bounded, growing pause (0.2 s .. 2 s) before trying the
server again, so a dead server costs no time per frame.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from typing import Any

import numpy as np

from ..errors import ModelFileError, StfpmError
from ..fileio import mask_secrets
from .base import Engine, EngineUnavailable, backend_options

URL = re.compile(r"^(?P<scheme>grpc|http|https):/{1,2}(?P<rest>.+)$", re.IGNORECASE)


def triton_url(spec) -> str | None:
    """``grpc://host:port/name`` (also as mangled by ``Path``: ``grpc:/host:port/name``) -> the URL, else None."""
    m = URL.match(str(spec))
    return f"{m['scheme'].lower()}://{m['rest']}" if m else None


class TritonEngine(Engine):
    """``?shm=1`` on the URL passes frames and maps through system shared memory instead of the socket
    (the server must run on this host)."""

    name = "triton"
    OPTIONS = backend_options("triton")

    def __init__(self, spec, timeout_s: float = 10.0, threads: int = 0):
        url = triton_url(spec)
        if url is None:
            raise ModelFileError(f"{spec}: not a served model; use grpc://host:8001/<name> or http://host:8000/<name>")
        u = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(u.query))
        unknown = sorted(set(query) - {"shm"})
        if unknown or query.get("shm", "0") not in ("0", "1"):
            raise ModelFileError(f"{mask_secrets(url)}: the only option of a served model is shm=0/1, got {u.query!r}")
        self.shm = query.get("shm") == "1"
        self._regions: dict[str, tuple] = {}  # kind -> (handle, byte size, region name)
        self._generation = 0  # every registration gets a fresh name: a stale one on the server never collides
        self._stale: list[str] = []  # names the server refused to unregister (still in use by a finishing request)
        self._shm_base = f"stfpm_{os.getpid()}_{id(self) & 0xFFFFFF:x}"  # region names: <base>_frames, _maps, _scores
        url = urllib.parse.urlunsplit((u.scheme, u.netloc, u.path, "", ""))
        self.url, self.scheme, self.timeout_s = url, u.scheme, float(timeout_s)
        self.server = u.netloc
        self.model_name = u.path.strip("/")
        if not self.server or not self.model_name or "/" in self.model_name:
            raise ModelFileError(f"{mask_secrets(url)}: give the server and the model name, e.g. grpc://127.0.0.1:8001/stfpm")
        try:
            if self.scheme == "grpc":
                import tritonclient.grpc as client
            else:
                import tritonclient.http as client
        except ImportError:
            raise StfpmError("a served model needs tritonclient (pip install 'stfpm-edge[serve]')") from None
        self._client_mod = client
        self._pause_until, self._failures = 0.0, 0
        self._client = self._connect()
        super().__init__(url, self._fetch_meta())

    def _connect(self):
        c = self._client_mod
        if self.scheme == "grpc":
            return c.InferenceServerClient(self.server)
        return c.InferenceServerClient(self.server, ssl=self.scheme == "https", connection_timeout=self.timeout_s, network_timeout=self.timeout_s)

    def _fetch_meta(self) -> dict[str, Any]:
        from ..serve.repo import metadata_from_parameters

        try:
            if self.scheme == "grpc":
                cfg = self._client.get_model_config(self.model_name, as_json=True, client_timeout=self.timeout_s)["config"]
            else:
                cfg = self._client.get_model_config(self.model_name)
        except Exception as exc:  # tritonclient raises its own InferenceServerException for refused, missing, timed out
            raise ModelFileError(f"{mask_secrets(self.url)}: the server did not give the model's config ({_short(exc)})") from None
        meta = metadata_from_parameters(cfg.get("parameters") or {})
        meta.setdefault("served", {})["max_batch_size"] = int(cfg.get("max_batch_size") or cfg.get("maxBatchSize") or 0)
        return meta

    def close(self) -> None:
        self._drop_regions()
        deadline = time.monotonic() + 1.0  # give a request the server is still releasing a moment, bounded
        while self._stale and time.monotonic() < deadline:
            time.sleep(0.05)
            self._retry_stale()
        try:
            self._client.close()
        except Exception:
            pass

    # -- system shared memory (?shm=1): three regions (frames, maps, scores), grown when a batch needs more
    def _region(self, kind: str, nbytes: int):
        import tritonclient.utils.shared_memory as shm

        have = self._regions.get(kind)
        if have is not None and have[1] >= nbytes:
            return have
        if have is not None:
            self._unregister(kind)
        self._retry_stale()
        self._generation += 1
        name = f"{self._shm_base}_{kind}_{self._generation}"
        handle = shm.create_shared_memory_region(name, "/" + name, nbytes)
        self._regions[kind] = (handle, nbytes, name)
        self._client.register_system_shared_memory(name, "/" + name, nbytes)
        return self._regions[kind]

    def _unregister(self, kind: str) -> None:
        import tritonclient.utils.shared_memory as shm

        handle, _, name = self._regions.pop(kind)
        try:
            self._client.unregister_system_shared_memory(name)
        except Exception:  # in use by a request the server is still releasing, or the server is gone
            self._stale.append(name)
        shm.destroy_shared_memory_region(handle)  # ours to free either way; the server keeps its own mapping

    def _retry_stale(self) -> None:
        names, self._stale = self._stale, []
        for name in names:
            try:
                self._client.unregister_system_shared_memory(name)
            except Exception:
                self._stale.append(name)

    def _drop_regions(self) -> None:
        for kind in list(self._regions):
            self._unregister(kind)
        self._retry_stale()

    def _shm_call(self, frames: np.ndarray, c):
        import tritonclient.utils.shared_memory as shm

        n, (h, w) = len(frames), (self.geometry.height, self.geometry.width)
        sizes = {"frames": frames.nbytes, "maps": n * h * w * 4, "scores": n * 4}
        regions = {k: self._region(k, v) for k, v in sizes.items()}
        handles = {k: r[0] for k, r in regions.items()}
        shm.set_shared_memory_region(handles["frames"], [np.ascontiguousarray(frames)])
        inp = c.InferInput("frames", list(frames.shape), "UINT8")
        inp.set_shared_memory(regions["frames"][2], sizes["frames"])
        outs = [c.InferRequestedOutput("anomaly_map"), c.InferRequestedOutput("score")]
        outs[0].set_shared_memory(regions["maps"][2], sizes["maps"])
        outs[1].set_shared_memory(regions["scores"][2], sizes["scores"])
        kwargs = {"client_timeout": self.timeout_s} if self.scheme == "grpc" else {}
        self._client.infer(self.model_name, [inp], outputs=outs, **kwargs)
        maps = shm.get_contents_as_numpy(handles["maps"], np.float32, [n, h, w]).copy()
        scores = shm.get_contents_as_numpy(handles["scores"], np.float32, [n]).copy()
        return maps, scores

    def _infer(self, frames: np.ndarray):
        most = self.meta["served"]["max_batch_size"]
        if most and len(frames) > most:  # the server's batch limit: send it in parts
            parts = [self._infer(frames[i : i + most]) for i in range(0, len(frames), most)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        now = time.monotonic()
        if now < self._pause_until:
            raise EngineUnavailable(f"{mask_secrets(self.url)}: server unavailable, retrying in {self._pause_until - now:.1f} s")
        c = self._client_mod
        try:
            if self.shm:
                maps, scores = self._shm_call(frames, c)
            else:
                inp = c.InferInput("frames", list(frames.shape), "UINT8")
                inp.set_data_from_numpy(np.ascontiguousarray(frames))
                outs = [c.InferRequestedOutput("anomaly_map"), c.InferRequestedOutput("score")]
                kwargs = {"client_timeout": self.timeout_s} if self.scheme == "grpc" else {}
                r = self._client.infer(self.model_name, [inp], outputs=outs, **kwargs)
                maps, scores = r.as_numpy("anomaly_map"), r.as_numpy("score")
        except Exception as exc:
            self._failures += 1
            self._pause_until = time.monotonic() + min(2.0, 0.2 * 2 ** (self._failures - 1))
            if self.shm:  # a restarted server knows none of our regions: register them again on the next call
                self._drop_regions()
            raise EngineUnavailable(f"{mask_secrets(self.url)}: {_short(exc)}") from None
        self._failures = 0
        if maps is None or scores is None:
            raise EngineUnavailable(f"{mask_secrets(self.url)}: the server's answer lacks anomaly_map or score")
        return maps.reshape(len(frames), *maps.shape[-2:]), scores.reshape(-1)


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
