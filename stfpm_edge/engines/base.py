"""The engine interface shared by the PyTorch, ONNX Runtime and TensorRT backends.

An engine is a context manager that owns its runtime resources and exposes
``infer(frames) -> (maps, scores)``: ``frames`` are uint8 BGR images already fitted to the model
size (``Geometry.fit_image``), shaped [N, H, W, 3] (or one [H, W, 3] frame); ``maps`` come back as
float32 [N, H, W], ``scores`` as float32 [N] (raw; see ``scoring``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError, StfpmError
from ..geometry import Geometry


class FrameError(StfpmError):
    """Frames handed to ``infer`` do not match what the model expects."""


class EngineUnavailable(StfpmError):
    """This call could not be served (a remote server away or timed out); later calls may succeed.
    The camera loop counts the frame failed and goes on."""


class Engine:
    name = "base"
    OPTIONS: tuple[str, ...] = ()  # keyword options the backend takes; open_engine routes only these

    def __init__(self, path: str | Path, meta: dict[str, Any]):
        self.path = Path(path)
        self.meta = meta
        try:
            self.geometry = Geometry(**meta["geometry"])
        except (KeyError, TypeError) as exc:
            raise ModelFileError(f"{path}: metadata has no usable geometry ({exc})") from None
        self.threshold: float | None = (meta.get("threshold") or {}).get("image")

    # -- context manager: resources are released on exit, also after an exception
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:  # overridden by backends that hold resources
        pass

    def device_timings(self) -> dict[str, float]:
        """Per-stage device times of the last ``infer`` (ms); empty for host-only backends."""
        return {}

    def check_frames(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        h, w = self.geometry.height, self.geometry.width
        if frames.dtype != np.uint8:
            raise FrameError(f"frames must be uint8 (camera pixels), got {frames.dtype}")
        if frames.ndim != 4 or frames.shape[1:] != (h, w, 3):
            raise FrameError(
                f"frames must be [N, {h}, {w}, 3] BGR at model size, got {list(frames.shape)}; "
                "fit them first with Geometry.fit_image"
            )
        return np.ascontiguousarray(frames)

    def infer(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        frames = self.check_frames(frames)
        maps, scores = self._infer(frames)
        return maps.reshape(len(frames), self.geometry.height, self.geometry.width), scores.reshape(len(frames))

    def _infer(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} does not implement _infer")


# backend -> ("module:Class", the keyword options it takes): one definition, read by the classes
# (their OPTIONS) and by engine_options, which names the backends an option belongs to without
# importing any of them (importing the PyTorch one costs seconds and pulls in torch)
BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch": ("stfpm_edge.engines.torch_engine:TorchEngine", ("device", "batch_size", "threads")),
    "onnxruntime": ("stfpm_edge.engines.ort_engine:OrtEngine", ("threads", "providers")),
    "tensorrt": ("stfpm_edge.engines.trt_engine:TensorRTEngine", ("build_if_stale", "zero_copy", "device", "threads")),
    "triton": ("stfpm_edge.engines.triton_engine:TritonEngine", ("timeout_s", "threads")),  # threads: accepted, the server owns its own
}
# suffix -> backend; modules are imported only when a file of that kind is opened
_BACKENDS = {".pt": "torch", ".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt"}


def backend_options(backend: str) -> tuple[str, ...]:
    return BACKENDS[backend][1]


def is_served(path) -> bool:
    """``grpc://host:port/name`` / ``http://...`` (also as ``Path`` mangles it: ``grpc:/host...``): a model served by Triton."""
    import re

    return re.match(r"^(grpc|https?):/", str(path), re.IGNORECASE) is not None


def _backend_name(path) -> str:
    if is_served(path):
        return "triton"
    path = Path(path)
    backend = _BACKENDS.get(path.suffix.lower())
    if backend is None:
        raise ModelFileError(f"{path}: unknown model type; expected one of {', '.join(sorted(_BACKENDS))} or grpc://host:port/NAME")
    return backend


def backend_class(path: str | Path) -> type[Engine]:
    """The backend class for a model file, by suffix (or a served model's URL); imports its module (not its runtime)."""
    backend = _backend_name(path)
    module_name, cls_name = BACKENDS[backend][0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("stfpm_edge"):
            raise ModelFileError(f"{path}: the backend for {path.suffix} files is not available in this version") from None
        raise
    return getattr(module, cls_name)


def engine_options(path: str | Path, **options: Any) -> dict[str, Any]:
    """Check a model file and route ``options`` to its backend: the ones it takes, or a clear error.

    ``options`` may hold any backend's options (``threads``, ``build_if_stale``, ``zero_copy``...).
    One the backend does not take, set to a non-default value, is an error naming the backends that
    take it, never silently ignored. Opens nothing, so callers can check before starting work.
    """
    backend = _backend_name(path)
    takes = backend_options(backend)
    path = Path(path)
    if not is_served(path) and not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    foreign = sorted(k for k, v in options.items() if k not in takes and v not in (None, False, 0, ""))
    if foreign:
        takers = [f"{name} ({', '.join(sfx for sfx, b in _BACKENDS.items() if b == name) or 'grpc://...'})"
                  for name, (_, opts) in BACKENDS.items() if any(n in opts for n in foreign)]
        raise StfpmError(f"{path}: option(s) {', '.join(foreign)} do not apply to {backend} models ({path.suffix or 'served'}); "
                         f"they apply to {', '.join(takers) or 'no backend'}")
    return {k: v for k, v in options.items() if k in takes}


def open_engine(path: str | Path, **options: Any) -> Engine:
    """Open a model file with the backend its suffix names (``.pt``, ``.onnx``, ``.engine``/``.plan``),
    passing it the options it takes (see ``engine_options``)."""
    target = path if is_served(path) else Path(path)
    return backend_class(path)(target, **engine_options(path, **options))
