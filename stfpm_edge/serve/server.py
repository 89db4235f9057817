"""`stfpm-edge serve MODEL`: a real Triton Inference Server on this machine, through PyTriton (which
bundles the ``tritonserver`` binary and its Python backend), running our own engine (ONNX Runtime on a
CPU, TensorRT on a GPU) behind Triton's dynamic batcher: HTTP, gRPC, health/ready, model metadata and
Prometheus metrics. Binds to 127.0.0.1 unless told otherwise.

The model's config carries the same ``parameters`` as a repository written by ``triton-repo``
(geometry, colour order, threshold, normal-score statistics, checkpoint hash), so the Triton client
engine works the same against both.
"""

from __future__ import annotations

import os
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..engines import engine_options, open_engine
from ..errors import StfpmError
from ..scoring import normalized_score
from ..stream.station import is_loopback
from .repo import client_parameters, model_name


@dataclass
class ServeOptions:
    name: str = "stfpm"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8
    queue_delay_us: int = 500
    instances: int = 1  # engines (each its own thread and runtime session) behind the one batcher
    threads: int = 0  # ONNX Runtime threads per instance (0 = its default)
    log_file: Path | None = None  # Triton's own log (default: the terminal)
    shm: bool = False  # let clients on this host register system shared memory (loopback binds only)

    def check(self) -> None:
        model_name(self.name)
        for label, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port), ("--metrics-port", self.metrics_port)):
            if not 1 <= port <= 65535:
                raise StfpmError(f"{label} must lie in 1..65535, got {port}")
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise StfpmError("--http-port, --grpc-port and --metrics-port must differ")
        if self.shm and not is_loopback(self.host):
            raise StfpmError("--allow-shm serves clients on this host only: bind --host to 127.0.0.1")
        if not 1 <= self.max_batch <= 1024 or not 1 <= self.instances <= 64 or not 0 <= self.queue_delay_us <= 10_000_000:
            raise StfpmError("--max-batch must lie in 1..1024, --instances in 1..64, --queue-delay-us in 0..10000000")


def server_environment() -> None:
    """Make the server's Python-backend stub load this interpreter's libpython, not the system's.

    Measured here: with an interpreter whose libpython is not the system one, the stub links the
    system library and model load fails with ``'_thread.RLock' object has no attribute
    '_recursion_count'``; the running interpreter's LIBDIR first on LD_LIBRARY_PATH fixes it."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = libdir + (":" + current if current else "")


def _check_ports_free(opts: ServeOptions) -> None:
    """A taken port is one clear line now, not a Triton start-up failure after a long wait."""
    import socket

    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    for label, port in (("--http-port", opts.http_port), ("--grpc-port", opts.grpc_port), ("--metrics-port", opts.metrics_port)):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((opts.host, port))
            except OSError as exc:
                raise StfpmError(f"{label} {port}: cannot listen on {opts.host} ({exc.strerror or exc}); is another server running?") from None


def _with_parameters(parameters: dict[str, dict[str, str]]) -> None:
    """Add our client parameters to the config PyTriton generates (it offers no option for them).

    PyTriton is pinned (0.7.0) and ``tests/test_serve.py`` reads the parameters back from a live
    server, so a change in its internals fails a test rather than a client."""
    from pytriton.models.model import Model

    original = getattr(Model._get_triton_model_config, "__wrapped__", Model._get_triton_model_config)

    def config(self):
        cfg = original(self)
        cfg.backend_parameters.update(parameters.get(self.model_name, {}))
        return cfg

    config.__wrapped__ = original
    Model._get_triton_model_config = config


def _infer_function(engine) -> Callable:
    from pytriton.decorators import batch

    @batch
    def infer(frames: np.ndarray):
        maps, scores = engine.infer(frames)
        thr = engine.threshold
        scores = np.asarray(scores, np.float32).reshape(-1, 1)
        return {"anomaly_map": np.asarray(maps, np.float32)[:, None], "score": scores,
                "normalized_score": np.asarray(normalized_score(scores, thr), np.float32)}

    return infer


def serve(model: Path, opts: ServeOptions, stop: threading.Event, on_ready: Callable[[dict], None] | None = None) -> None:
    """Serve ``model`` until ``stop`` is set. ``on_ready`` gets the endpoints once the model is loaded."""
    opts.check()
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig
    except ImportError:
        raise StfpmError("serve needs the [serve] extra (pip install 'stfpm-edge[serve]': PyTriton with its bundled Triton server)") from None
    _check_ports_free(opts)
    options = engine_options(model, threads=opts.threads)
    engines = [open_engine(model, **options) for _ in range(opts.instances)]
    try:
        meta = engines[0].meta
        h, w = engines[0].geometry.height, engines[0].geometry.width
        _with_parameters({opts.name: client_parameters(meta)})
        server_environment()
        config = TritonConfig(http_address=opts.host, http_port=opts.http_port, grpc_address=opts.host, grpc_port=opts.grpc_port,
                              metrics_address=opts.host, metrics_port=opts.metrics_port, allow_metrics=True, exit_timeout_secs=5,
                              log_file=str(opts.log_file) if opts.log_file else None)
        # PyTriton guards shared-memory registration with a token of its own; --allow-shm opens it to
        # clients on this host (the bind is loopback), the other guarded endpoints stay guarded
        security = TritonSecurityConfig(restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "shared-memory"]) if opts.shm else None
        with Triton(config=config, security_config=security) as triton:
            triton.bind(
                model_name=opts.name,
                infer_func=[_infer_function(e) for e in engines],
                inputs=[Tensor(name="frames", dtype=np.uint8, shape=(h, w, 3))],
                outputs=[Tensor(name="anomaly_map", dtype=np.float32, shape=(1, h, w)),
                         Tensor(name="score", dtype=np.float32, shape=(1,)),
                         Tensor(name="normalized_score", dtype=np.float32, shape=(1,))],
                config=ModelConfig(max_batch_size=opts.max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=opts.queue_delay_us)),
                strict=True,
            )
            triton.run()
            host = f"[{opts.host}]" if ":" in opts.host else opts.host
            if on_ready is not None:
                on_ready({"grpc": f"grpc://{host}:{opts.grpc_port}/{opts.name}", "http": f"http://{host}:{opts.http_port}/{opts.name}",
                          "metrics": f"http://{host}:{opts.metrics_port}/metrics"})
            while not stop.wait(0.5):
                if not triton.is_alive():
                    raise StfpmError("the Triton server stopped on its own (see its log above)")
    finally:
        for e in engines:
            e.close()
