"""Build TensorRT engines from the fused ONNX graph: one code path for TensorRT 8.6, 10.x and 11.x.

Features are detected on the imported module, as Polygraphy does, never inferred from a version
string alone:

- ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` is set only below 10 (deprecated in 10, gone in 11).
- Weak typing (``BuilderFlag.FP16`` / ``INT8``) exists on 8.6 and 10.x: FP16 is the builder flag on
  the FP32 graph, with the anomaly-map head constrained to FP32 (``OBEY_PRECISION_CONSTRAINTS``);
  INT8 is the INT8 flag on the Q/DQ graph (explicit quantisation).
- Without weak typing (11.x) the network is strongly typed: FP16 is built from the FP16 ONNX variant
  (backbones FP16, head FP32 inside the graph), INT8 from the Q/DQ variant; no precision flags.

``tensorrt`` and ``pycuda`` are imported only when a build or a GPU query runs.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, ModelFileError, StfpmError
from ..fileio import atomic_write_bytes, atomic_write_json, sha256_file, sidecar_path
from ..onnxmeta import is_head_node, metadata_from_props

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = ("TensorRT is not installed. On a desktop GPU: pip install 'stfpm-edge[tensorrt]' (tensorrt, pycuda); "
                "on Jetson, TensorRT comes with JetPack and pycuda builds against its CUDA (pip install pycuda)")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable(INSTALL_HINT) from None
    return trt


@dataclass(frozen=True)
class TrtFeatures:
    version: str
    major: int
    explicit_batch_flag: bool  # must be passed to create_network (8.x)
    weak_typing: bool  # BuilderFlag.FP16 / INT8 exist (8.6, 10.x)
    strongly_typed_flag: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED exists (9.x, 10.x)


def detect_features(trt) -> TrtFeatures:
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    flags = getattr(trt, "BuilderFlag", None)
    return TrtFeatures(
        version=version,
        major=major,
        explicit_batch_flag=major < 10 and creation is not None and hasattr(creation, "EXPLICIT_BATCH"),
        weak_typing=flags is not None and hasattr(flags, "FP16") and hasattr(flags, "INT8"),
        strongly_typed_flag=creation is not None and hasattr(creation, "STRONGLY_TYPED"),
    )


def gpu_info() -> dict[str, Any]:
    """Name and compute capability of GPU 0, via pycuda (imported here only)."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise BackendUnavailable("pycuda is not installed: pip install pycuda (on Jetson it builds against JetPack's CUDA)") from None
    cuda.init()
    dev = cuda.Device(0)
    major, minor = dev.compute_capability()
    return {"name": dev.name(), "compute_capability": f"{major}.{minor}", "integrated": bool(dev.get_attribute(cuda.device_attribute.INTEGRATED))}


def _onnx_meta(onnx_path: Path) -> dict[str, Any]:
    if onnx_path.stat().st_size == 0:
        raise ModelFileError(f"{onnx_path}: the file is empty; export it again with `stfpm-edge export MODEL.pt`")
    sidecar = sidecar_path(onnx_path)
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    import onnx

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # truncated or not ONNX at all
        raise ModelFileError(f"{onnx_path}: not a readable ONNX file ({exc.__class__.__name__})") from None
    return metadata_from_props({p.key: p.value for p in proto.metadata_props}, onnx_path)


@dataclass
class BuildOptions:
    precision: str = "fp16"
    workspace_mb: int = 1024
    timing_cache: str | None = None
    dla_core: int | None = None
    max_batch: int = 1  # a graph exported with a free batch (--dynamic) gets an optimisation profile 1..max_batch


def plan_build(features: TrtFeatures, onnx_precision: str, options: BuildOptions) -> dict[str, Any]:
    """What the builder must do for this TensorRT, precision and ONNX variant (pure; tested with fakes)."""
    p = options.precision
    if p not in PRECISIONS:
        raise StfpmError(f"precision {p!r} is not one of {', '.join(PRECISIONS)}")
    plan: dict[str, Any] = {"explicit_batch": features.explicit_batch_flag, "strongly_typed": False, "flags": [], "head_fp32_constraints": False}
    if p == "int8":
        if onnx_precision != "int8":
            raise StfpmError("INT8 engines are built from the Q/DQ graph: run `stfpm-edge calibrate model.onnx` and build model_int8.onnx")
        if features.weak_typing:
            plan["flags"].append("INT8")
        else:
            plan["strongly_typed"] = True
    elif p == "fp16":
        if features.weak_typing:
            if onnx_precision != "fp32":
                raise StfpmError(f"TensorRT {features.version}: build FP16 from the FP32 graph (model.onnx); the builder flag does the rest")
            plan["flags"] += ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
            plan["head_fp32_constraints"] = True
        else:
            if onnx_precision != "fp16":
                raise StfpmError(f"TensorRT {features.version} has no FP16 builder flag (strong typing only): export the FP16 variant "
                                 "with `stfpm-edge export MODEL.pt --precision fp16` and build that")
            plan["strongly_typed"] = True
    else:
        if onnx_precision != "fp32":
            raise StfpmError(f"an FP32 engine needs the FP32 graph, not the {onnx_precision} variant")
        plan["strongly_typed"] = not features.weak_typing
    if options.dla_core is not None:
        plan["flags"].append("GPU_FALLBACK")
    return plan


def build_engine(onnx_path: str | Path, out_dir: str | Path = "engines", options: BuildOptions | None = None, trt=None, gpu: dict | None = None) -> tuple[Path, dict[str, Any]]:
    """Parse, configure and build; write ``<name>_<precision>.engine`` and its JSON sidecar atomically."""
    options = options or BuildOptions()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ModelFileError(f"{onnx_path}: ONNX file not found")
    meta = _onnx_meta(onnx_path)  # an empty or foreign file is named before TensorRT is looked for
    trt = trt or import_tensorrt()
    features = detect_features(trt)
    plan = plan_build(features, meta.get("precision", "fp32"), options)
    gpu = gpu or gpu_info()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan["explicit_batch"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan["strongly_typed"] and features.strongly_typed_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelFileError(f"{onnx_path}: TensorRT {features.version} cannot parse it: " + "; ".join(errors[:5]))

    config = builder.create_builder_config()
    if meta.get("batch") == "dynamic":  # a free batch dimension needs an optimisation profile (Triton's batcher: 1..max)
        geo = meta["geometry"]
        shape = lambda n: (n, int(geo["height"]), int(geo["width"]), 3)  # noqa: E731
        profile = builder.create_optimization_profile()
        profile.set_shape("frames", shape(1), shape(options.max_batch), shape(options.max_batch))
        config.add_optimization_profile(profile)
    elif options.max_batch > int(meta.get("batch") or 1):
        raise StfpmError(f"{onnx_path}: exported with a fixed batch of {meta.get('batch')}; --max-batch {options.max_batch} needs "
                         "`stfpm-edge export MODEL.pt --dynamic`")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    for flag in plan["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan["head_fp32_constraints"]:
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if is_head_node(layer.name):
                layer.precision = trt.float32
                for k in range(layer.num_outputs):
                    layer.set_output_type(k, trt.float32)
    if options.dla_core is not None:
        if getattr(builder, "num_DLA_cores", 0) < 1:
            raise StfpmError(f"--dla-core {options.dla_core}: this GPU ({gpu.get('name')}) has no DLA cores; DLA exists on Jetson AGX/NX modules")
        if options.dla_core >= builder.num_DLA_cores:
            raise StfpmError(f"--dla-core {options.dla_core}: this device has {builder.num_DLA_cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(options.dla_core)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StfpmError(f"TensorRT {features.version} failed to build an engine from {onnx_path} ({options.precision}); "
                         "see the TensorRT log above; a larger --workspace may help")
    out_dir = Path(out_dir)
    engine_path = out_dir / engine_name(onnx_path, options.precision)
    atomic_write_bytes(engine_path, bytes(serialized))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    sidecar = {
        "format": "stfpm-edge/tensorrt/1",
        "tensorrt_version": features.version,
        "gpu": gpu,
        "host": platform.machine(),
        "precision": options.precision,
        "build_options": asdict(options),
        "build_plan": plan,
        "onnx": {"path": str(onnx_path.resolve()), "sha256": sha256_file(onnx_path)},
        "engine_sha256": sha256_file(engine_path),
        "model": meta,
    }
    atomic_write_json(sidecar_path(engine_path), sidecar)
    return engine_path, sidecar


def engine_name(onnx_path: Path, precision: str) -> str:
    """model.onnx -> model_fp16.engine; model_int8.onnx -> model_int8.engine (no doubled suffix)."""
    stem = onnx_path.stem
    return f"{stem}.engine" if stem.endswith(f"_{precision}") else f"{stem}_{precision}.engine"


def stale_reasons(sidecar: dict[str, Any], trt_version: str, gpu: dict[str, Any], onnx_sha256: str | None) -> list[str]:
    """Why an engine may not be used here; empty when it matches this TensorRT, GPU and ONNX."""
    reasons = []
    if sidecar.get("tensorrt_version") != trt_version:
        reasons.append(f"built with TensorRT {sidecar.get('tensorrt_version')}, this machine has {trt_version}")
    built_gpu = sidecar.get("gpu") or {}
    if built_gpu.get("name") != gpu.get("name") or built_gpu.get("compute_capability") != gpu.get("compute_capability"):
        reasons.append(f"built for {built_gpu.get('name')} (sm {built_gpu.get('compute_capability')}), this GPU is {gpu.get('name')} (sm {gpu.get('compute_capability')})")
    if onnx_sha256 is not None and (sidecar.get("onnx") or {}).get("sha256") != onnx_sha256:
        reasons.append(f"its ONNX file {(sidecar.get('onnx') or {}).get('path')} changed since the build")
    return reasons


def rebuild_command(sidecar: dict[str, Any]) -> str:
    o = sidecar.get("build_options") or {}
    onnx = (sidecar.get("onnx") or {}).get("path", "model.onnx")
    cmd = f"stfpm-edge build {onnx} --precision {o.get('precision', 'fp16')}"
    if o.get("dla_core") is not None:
        cmd += f" --dla-core {o['dla_core']}"
    return cmd


def trtexec_command(onnx_path: str | Path, precision: str, weak_typing: bool = True) -> str:
    """The trtexec command equivalent to our build (printed by ``stfpm-edge build --trtexec``)."""
    import onnx

    onnx_path = Path(onnx_path)
    engine = engine_name(onnx_path, precision)
    cmd = f"trtexec --onnx={onnx_path} --saveEngine={engine}"
    if not weak_typing or precision == "fp32":
        return cmd  # strongly typed (11.x) or FP32: the graph alone fixes the precisions
    if precision == "int8":
        return cmd + " --int8"
    head = [n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.op_type != "Constant" and is_head_node(n.name)]
    spec = ",".join(f"{name}:fp32" for name in head)
    return cmd + f" --fp16 --precisionConstraints=obey --layerPrecisions={spec} --layerOutputTypes={spec}"
