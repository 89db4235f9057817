"""A model served by Triton Inference Server, behind the same ``Engine`` interface:
``grpc://host:8001/<name>`` or ``http://host:8000/<name>`` wherever a model file is accepted.

Geometry, threshold and the rest of the metadata come from the served model's config parameters
(written by ``triton-repo`` and ``serve``). Every call has a bounded timeout. A server that goes away
makes frames fail (``EngineUnavailable``: the caller counts the frame failed and goes on), never the
process; after a failure the engine waits a bounded, growing pause (0.2 s .. 2 s) before trying the
server again, so a dead server costs no time per frame.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from typing import Any

import numpy as np

from ..errors import ModelFileError, StfpmError
from ..fileio import mask_secrets
from .base import Engine, EngineUnavailable

URL = re.compile(r"^(?P<scheme>grpc|http|https):/{1,2}(?P<rest>.+)$", re.IGNORECASE)


def triton_url(spec) -> str | None:
    """``grpc://host:port/name`` (also as mangled by ``Path``: ``grpc:/host:port/name``) -> the URL, else None."""
    m = URL.match(str(spec))
    return f"{m['scheme'].lower()}://{m['rest']}" if m else None


class TritonEngine(Engine):
    name = "triton"
    OPTIONS = ("timeout_s", "threads")  # threads: accepted and ignored (the server owns its threads)

    def __init__(self, spec, timeout_s: float = 10.0, threads: int = 0):
        url = triton_url(spec)
        if url is None:
            raise ModelFileError(f"{spec}: not a served model; use grpc://host:8001/<name> or http://host:8000/<name>")
        u = urllib.parse.urlsplit(url)
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
        self.calls = self.failed_calls = 0
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
        try:
            self._client.close()
        except Exception:
            pass

    def _infer(self, frames: np.ndarray):
        most = self.meta["served"]["max_batch_size"]
        if most and len(frames) > most:  # the server's batch limit: send it in parts
            parts = [self._infer(frames[i : i + most]) for i in range(0, len(frames), most)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        now = time.monotonic()
        if now < self._pause_until:
            raise EngineUnavailable(f"{mask_secrets(self.url)}: server unavailable, retrying in {self._pause_until - now:.1f} s")
        c = self._client_mod
        inp = c.InferInput("frames", list(frames.shape), "UINT8")
        inp.set_data_from_numpy(np.ascontiguousarray(frames))
        outs = [c.InferRequestedOutput("anomaly_map"), c.InferRequestedOutput("score")]
        self.calls += 1
        try:
            if self.scheme == "grpc":
                r = self._client.infer(self.model_name, [inp], outputs=outs, client_timeout=self.timeout_s)
            else:
                r = self._client.infer(self.model_name, [inp], outputs=outs)
            maps, scores = r.as_numpy("anomaly_map"), r.as_numpy("score")
        except Exception as exc:
            self.failed_calls += 1
            self._failures += 1
            self._pause_until = time.monotonic() + min(2.0, 0.2 * 2 ** (self._failures - 1))
            raise EngineUnavailable(f"{mask_secrets(self.url)}: {_short(exc)}") from None
        self._failures = 0
        if maps is None or scores is None:
            raise EngineUnavailable(f"{mask_secrets(self.url)}: the server's answer lacks anomaly_map or score")
        return maps.reshape(len(frames), *maps.shape[-2:]), scores.reshape(-1)


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
