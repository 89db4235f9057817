"""TensorRT runtime behind the common engine interface (``.engine`` / ``.plan`` files).

pycuda with the device's primary context (never ``pycuda.autoinit``): the thread that opens the
engine owns the context, the engine, the buffers and the stream, and must be the one calling
``infer`` (the camera loop opens engines inside its inference thread for that reason). Page-locked
host buffers, asynchronous copies and ``execute_async_v3`` on one stream; on Jetson (an integrated
GPU) ``zero_copy=True`` maps host memory into the GPU instead of copying. ``close`` releases
everything in reverse order and pops the context, so no "context stack not empty" at exit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, ModelFileError
from ..fileio import sha256_file, sidecar_path
from .base import Engine, backend_options
from .trt_build import BuildOptions, build_engine, gpu_info, import_tensorrt, rebuild_command, stale_reasons


def _load_sidecar(path: Path) -> dict:
    side = sidecar_path(path)
    if not side.is_file():
        raise ModelFileError(f"{path}: no sidecar {side.name}; engines are only usable with the sidecar `stfpm-edge build` writes")
    return json.loads(side.read_text())


class TensorRTEngine(Engine):
    name = "tensorrt"
    # threads: accepted (and unused: the work runs on the GPU) so that one option set, e.g. bench's
    # --threads for the CPU backends, can be handed to every engine
    OPTIONS = backend_options("tensorrt")

    def __init__(self, path: str | Path, build_if_stale: bool = False, zero_copy: bool = False, device: int = 0, threads: int = 0):
        path = Path(path)
        trt = import_tensorrt()
        try:
            import pycuda.driver as cuda
        except ImportError:
            raise BackendUnavailable("pycuda is not installed: pip install pycuda") from None
        sidecar = _load_sidecar(path)
        gpu = gpu_info()
        onnx_file = Path((sidecar.get("onnx") or {}).get("path", ""))
        reasons = stale_reasons(sidecar, trt.__version__, gpu, sha256_file(onnx_file) if onnx_file.is_file() else None)
        if reasons:
            if build_if_stale and onnx_file.is_file():
                opts = BuildOptions(**sidecar["build_options"])
                path, sidecar = build_engine(onnx_file, path.parent, opts, trt=trt, gpu=gpu)
            else:
                raise ModelFileError(f"{path} is stale: " + "; ".join(reasons) + f". Rebuild it on this machine: {rebuild_command(sidecar)} "
                                     "(or pass --build-if-stale to stfpm-edge run)")
        super().__init__(path, sidecar["model"])
        self._cuda = cuda
        cuda.init()
        self._ctx = cuda.Device(device).retain_primary_context()
        self._ctx.push()
        try:
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise ModelFileError(f"{path}: TensorRT could not deserialize the engine; rebuild it: {rebuild_command(sidecar)}")
            self._context = self._engine.create_execution_context()
            self._stream = cuda.Stream()
            self._zero_copy = zero_copy
            self._tensors = {}
            for i in range(self._engine.num_io_tensors):
                name = self._engine.get_tensor_name(i)
                is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                shape = list(self._engine.get_tensor_shape(name))
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
                self._tensors[name] = {"input": is_input, "shape": shape, "dtype": dtype}
            self.input_name = next(n for n, t in self._tensors.items() if t["input"])
            in_shape = self._tensors[self.input_name]["shape"]
            if in_shape[0] == -1:  # dynamic batch: buffers for the profile's maximum
                self.batch = int(self._engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
                self.dynamic = True
            else:
                self.batch = int(in_shape[0])
                self.dynamic = False
            self._buffers = {}
            for name, t in self._tensors.items():
                shape = [self.batch] + [int(d) for d in t["shape"][1:]]
                if zero_copy:
                    host = cuda.pagelocked_empty(shape, t["dtype"], mem_flags=cuda.host_alloc_flags.DEVICEMAP)
                    dev_ptr = int(host.base.get_device_pointer())
                    device = None
                else:
                    host = cuda.pagelocked_empty(shape, t["dtype"])
                    device = cuda.mem_alloc(host.nbytes)
                    dev_ptr = int(device)
                self._buffers[name] = (host, device)
                self._context.set_tensor_address(name, dev_ptr)
            self._events = [cuda.Event() for _ in range(4)]
            self.last_timings_ms: dict[str, float] = {}
        except BaseException:
            self._ctx.pop()
            raise

    def _infer(self, frames: np.ndarray):
        cuda = self._cuda
        maps, scores = [], []
        start, after_h2d, after_exec, after_d2h = self._events
        for i in range(0, len(frames), self.batch):
            chunk = frames[i : i + self.batch]
            n = len(chunk)
            host_in, dev_in = self._buffers[self.input_name]
            host_in[:n] = chunk
            if n < self.batch:
                host_in[n:] = 0
            if self.dynamic:
                self._context.set_input_shape(self.input_name, (self.batch,) + tuple(chunk.shape[1:]))
            start.record(self._stream)
            if dev_in is not None:
                cuda.memcpy_htod_async(dev_in, host_in, self._stream)
            after_h2d.record(self._stream)
            if not self._context.execute_async_v3(self._stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            after_exec.record(self._stream)
            for name, t in self._tensors.items():
                host, dev = self._buffers[name]
                if not t["input"] and dev is not None:
                    cuda.memcpy_dtoh_async(host, dev, self._stream)
            after_d2h.record(self._stream)
            self._stream.synchronize()
            self.last_timings_ms = {"h2d": after_h2d.time_since(start), "compute": after_exec.time_since(after_h2d), "d2h": after_d2h.time_since(after_exec)}
            maps.append(self._buffers["anomaly_map"][0][:n].copy())
            scores.append(self._buffers["score"][0][:n].copy())
        return np.concatenate(maps), np.concatenate(scores)

    def device_timings(self) -> dict[str, float]:
        """Host-to-device, compute and device-to-host of the last batch, from CUDA events (ms)."""
        return dict(self.last_timings_ms)

    def close(self) -> None:
        if getattr(self, "_ctx", None) is None:
            return
        try:
            self._stream.synchronize()
            for host, dev in self._buffers.values():
                if dev is not None:
                    dev.free()
            self._buffers = {}
            self._context = None
            self._engine = None
            self._runtime = None
            self._stream = None
        finally:
            self._ctx.pop()
            self._ctx.detach()
            self._ctx = None
