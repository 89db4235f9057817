"""A Triton Inference Server model repository for our fused graph: ``DIR/<name>/config.pbtxt`` and
``DIR/<name>/1/model.onnx`` (ONNX Runtime backend) or ``DIR/<name>/1/model.plan`` (TensorRT).

The official Triton container serves it as is. The config names the tensors of the fused graph
(input ``frames`` uint8 [H, W, 3] per request item; outputs ``anomaly_map`` [1, H, W], ``score`` and
``normalized_score`` as batch-only tensors: ``dims: [1]`` with ``reshape: { shape: [] }``), turns on
the dynamic batcher, and carries in ``parameters`` everything a client needs (geometry, colour
order, threshold, normal-score statistics, the checkpoint's hash), so a client needs no sidecar.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFileError, StfpmError
from ..fileio import atomic_write_text, sidecar_path

PARAMETER_KEY = "stfpm_edge"  # the whole client-side metadata, JSON
OUTPUTS = ("anomaly_map", "score", "normalized_score")


@dataclass
class RepoOptions:
    max_batch: int = 8
    queue_delay_us: int = 500  # how long the dynamic batcher waits to fill a batch
    instances: int = 1
    kind: str = "auto"  # instance_group kind: auto (Triton decides), cpu or gpu

    def check(self) -> None:
        if not 1 <= self.max_batch <= 1024:
            raise StfpmError(f"--max-batch must lie in 1..1024, got {self.max_batch}")
        if not 0 <= self.queue_delay_us <= 10_000_000:
            raise StfpmError(f"--queue-delay-us must lie in 0..10000000, got {self.queue_delay_us}")
        if not 1 <= self.instances <= 64:
            raise StfpmError(f"--instances must lie in 1..64, got {self.instances}")
        if self.kind not in ("auto", "cpu", "gpu"):
            raise StfpmError(f"--kind must be auto, cpu or gpu, got {self.kind!r}")


def model_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", value):
        raise StfpmError(f"model name {value!r}: use letters, digits, '_', '-', '.' (Triton repository folder names)")
    return value


def client_parameters(meta: dict[str, Any]) -> dict[str, str]:
    """What a client needs, as Triton string parameters: one JSON blob plus readable single keys."""
    keep = ("geometry", "input", "normalization", "threshold", "normal_stats", "backbone", "map_post", "source_checkpoint", "tool_version")
    blob = {k: meta[k] for k in keep if k in meta}
    heldout = (blob.get("normal_stats") or {}).get("heldout_scores")
    if heldout is not None and len(heldout) > 2000:  # keep the config small: the station's preview needs only a sample
        blob["normal_stats"] = {**blob["normal_stats"], "heldout_scores": heldout[:: max(1, len(heldout) // 2000)]}
    geo = meta["geometry"]
    return {
        PARAMETER_KEY: json.dumps(blob, separators=(",", ":")),
        "geometry": f"{geo['height']}x{geo['width']} {geo.get('mode', 'squash')}",
        "colour_order": (meta.get("input") or {}).get("colour_order", "BGR"),
        "threshold": repr(float((meta.get("threshold") or {}).get("image", float("nan")))),
        "checkpoint_sha256": (meta.get("source_checkpoint") or {}).get("sha256", ""),
    }


def _quote(text: str) -> str:
    return json.dumps(text)  # a protobuf text-format string literal: JSON's escaping is a valid subset


def config_pbtxt(name: str, platform: str, meta: dict[str, Any], opts: RepoOptions) -> str:
    geo = meta["geometry"]
    h, w = int(geo["height"]), int(geo["width"])
    lines = [
        f"name: {_quote(name)}",
        f"platform: {_quote(platform)}",
        f"max_batch_size: {opts.max_batch}",
        "input [",
        f'  {{ name: "frames" data_type: TYPE_UINT8 format: FORMAT_NHWC dims: [ {h}, {w}, 3 ] }}',
        "]",
        "output [",
        f'  {{ name: "anomaly_map" data_type: TYPE_FP32 dims: [ 1, {h}, {w} ] }},',
        '  { name: "score" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } },',
        '  { name: "normalized_score" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } }',
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(str(b) for b in sorted({b for b in (1, 2, 4, 8, 16, 32) if b <= opts.max_batch} | {opts.max_batch}))} ]",
        f"  max_queue_delay_microseconds: {opts.queue_delay_us}",
        "}",
        "instance_group [",
        f"  {{ count: {opts.instances} kind: {dict(auto='KIND_AUTO', cpu='KIND_CPU', gpu='KIND_GPU')[opts.kind]} }}",
        "]",
    ]
    for key, value in client_parameters(meta).items():
        lines.append(f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"


def _onnx_meta(path: Path, opts: RepoOptions) -> dict[str, Any]:
    import onnx

    from ..onnxmeta import metadata_from_props

    proto = onnx.load(str(path), load_external_data=False)
    meta = metadata_from_props({p.key: p.value for p in proto.metadata_props}, path)
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if dim0.HasField("dim_value"):
        raise StfpmError(f"{path}: exported with a fixed batch of {dim0.dim_value}; Triton's batcher needs a free batch dimension: "
                         f"`stfpm-edge export MODEL.pt --dynamic` (or give triton-repo the .pt)")
    return meta


def _plan_meta(path: Path, opts: RepoOptions) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        raise ModelFileError(f"{path}: no sidecar {side.name}; build the engine with `stfpm-edge build` (it writes one)")
    meta = json.loads(side.read_text())
    model = meta.get("model") or {}
    profile = int((meta.get("build_options") or {}).get("max_batch") or 1) if model.get("batch", "dynamic") == "dynamic" else 0
    if not profile:
        raise StfpmError(f"{path}: built from a graph with a fixed batch of {model.get('batch')}; Triton's batcher needs "
                         f"`stfpm-edge export MODEL.pt --dynamic` and `stfpm-edge build model.onnx --max-batch {opts.max_batch}`")
    if profile < opts.max_batch:
        raise StfpmError(f"{path}: built for batches up to {profile}; rebuild with `stfpm-edge build model.onnx --max-batch {opts.max_batch}` "
                         "or lower --max-batch")
    if "geometry" not in model:
        raise ModelFileError(f"{path}: its sidecar holds no model metadata; rebuild it with `stfpm-edge build`")
    return model


def write_repository(model: Path, out: Path, name: str, opts: RepoOptions) -> Path:
    """Add ``model`` (a dynamic-batch .onnx, or a TensorRT .engine/.plan with its sidecar) to the
    repository at ``out`` as ``name``; returns the model's folder. Replaces an older copy of ``name``
    only once the new one is complete."""
    opts.check()
    model, name = Path(model), model_name(name)
    if not model.is_file():
        raise ModelFileError(f"{model}: model file not found")
    suffix = model.suffix.lower()
    if suffix == ".onnx":
        meta, platform, target = _onnx_meta(model, opts), "onnxruntime_onnx", "model.onnx"
    elif suffix in (".engine", ".plan"):
        meta, platform, target = _plan_meta(model, opts), "tensorrt_plan", "model.plan"
    else:
        raise ModelFileError(f"{model}: triton-repo takes an exported .onnx (or a .pt, exported for you) or a TensorRT .engine/.plan")
    folder = Path(out) / name
    staging = Path(out) / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "1").mkdir(parents=True)
    shutil.copyfile(model, staging / "1" / target)
    external = model.with_name(model.name + ".data")
    if external.is_file():  # a graph saved with external weights
        shutil.copyfile(external, staging / "1" / external.name)
    atomic_write_text(staging / "config.pbtxt", config_pbtxt(name, platform, meta, opts))
    if folder.exists():
        old = Path(out) / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(folder)
    return folder


def metadata_from_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """A served model's metadata (as ``Engine.meta``) from its config's parameters."""
    entry = parameters.get(PARAMETER_KEY)
    value = entry.get("string_value") if isinstance(entry, dict) else getattr(entry, "string_value", entry)
    if not value:
        raise ModelFileError("the served model's config has no stfpm_edge parameter: serve a repository written by `stfpm-edge triton-repo`")
    return json.loads(value)
