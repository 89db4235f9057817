"""The fused ONNX graph: uint8 BGR frames in; anomaly map, raw score and normalised score out.

Teacher, student, preprocessing (cast, BGR->RGB, mean/std) and the anomaly map are one graph,
exported from ``model.STFPM`` itself, so the deployed map is the trained map by construction.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..checkpoint import load_checkpoint
from ..errors import StfpmError
from ..fileio import sha256_file
from ..model import STFPM, flops_per_frame
from ..onnxmeta import save_onnx
from ..scoring import normalized_score

OPSET = 17  # the ceiling of TensorRT 8.6 (JetPack 5 / 6.0)
INPUT = "frames"
OUTPUTS = ("anomaly_map", "score", "normalized_score")
PRECISIONS = ("fp32", "fp16")


class Deployable(nn.Module):
    """STFPM plus the normalised score (0.5 at the operating threshold), for a camera-side consumer."""

    def __init__(self, model: STFPM, threshold: float):
        super().__init__()
        self.model = model
        self.threshold = float(threshold)

    def forward(self, frames: torch.Tensor):
        amap, score = self.model(frames)
        return amap, score, normalized_score(score, self.threshold)


class _StaticPadConv2d(nn.Conv2d):
    """A TF-"SAME" convolution whose padding was computed once for the export's fixed input size."""

    static_pad: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.static_pad, value=0.0), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def freeze_same_padding(model: nn.Module, example: torch.Tensor) -> int:
    """Replace timm's dynamic TF-"SAME" padding with constant pads for ``example``'s size.

    timm's tf_* models compute their stride-2 padding from the input shape at run time, which
    exports as Shape/Ceil/Pad subgraphs; the model size is fixed, so the pads are constants.
    Weights and state-dict keys are untouched. Returns the number of convolutions changed.
    """
    sizes: dict[str, tuple[int, int]] = {}
    targets = {name: m for name, m in model.named_modules() if type(m).__name__ == "Conv2dSame"}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:])))
             for name, m in targets.items()]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    for name, m in targets.items():
        pads = []
        for size, k, s, d in zip(sizes[name], m.kernel_size, m.stride, m.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        m.__class__ = _StaticPadConv2d
        m.static_pad = (left, right, top, bottom)
    return len(targets)


def deploy_metadata(meta: dict[str, Any], checkpoint: Path, precision: str, batch: int | None) -> dict[str, Any]:
    keep = ("backbone", "layers", "map_post", "geometry", "input", "normalization", "threshold", "normal_stats", "dataset", "config", "memory_whole")
    out = {k: meta[k] for k in keep if k in meta}
    out.update({
        "format": "stfpm-edge/onnx/1",
        "precision": precision,
        "batch": batch if batch is not None else "dynamic",
        "opset": OPSET,
        "outputs": {"anomaly_map": "float32 [N,1,H,W]", "score": "float32 [N] raw", "normalized_score": "float32 [N], 0.5 = threshold"},
        "source_checkpoint": {"path": str(checkpoint), "sha256": sha256_file(checkpoint)},
        "checkpoint_metrics": {k: (meta.get("metrics") or {}).get(k) for k in ("image_auroc", "pixel_auroc", "pixel_f1", "aupro")},
        "tool_version": __version__,
    })
    return out


def export_onnx(checkpoint: str | Path, out: str | Path, batch: int = 1, dynamic: bool = False, precision: str = "fp32") -> dict[str, Any]:
    """Export the fused graph; returns its metadata. ``dynamic`` makes the batch dimension free."""
    import onnx

    if precision not in PRECISIONS:
        raise StfpmError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} (INT8 comes from `stfpm-edge calibrate`)")
    if batch < 1:
        raise StfpmError("--batch must be at least 1")
    checkpoint, out = Path(checkpoint), Path(out)
    model, meta = load_checkpoint(checkpoint)
    if (meta.get("threshold") or {}).get("image") is None:
        raise StfpmError(f"{checkpoint}: has no threshold; train it with stfpm-edge train")
    model = model.to(memory_format=torch.contiguous_format)
    geo = meta["geometry"]
    freeze_same_padding(model, torch.zeros(1, geo["height"], geo["width"], 3, dtype=torch.uint8))
    flops = flops_per_frame(model, geo["height"], geo["width"])
    if precision == "fp16":
        model.half_backbones()
    dummy = torch.zeros(batch, geo["height"], geo["width"], 3, dtype=torch.uint8)
    axes = {name: {0: "batch"} for name in (INPUT, *OUTPUTS)} if dynamic else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter gives plain opset-17 graphs with named module scopes, which
        # the INT8 step uses to keep the head in FP32.
        torch.onnx.export(Deployable(model, meta["threshold"]["image"]).eval(), (dummy,), buf, dynamo=False,
                          opset_version=OPSET, input_names=[INPUT], output_names=list(OUTPUTS), dynamic_axes=axes,
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    info = deploy_metadata(meta, checkpoint, precision, None if dynamic else batch)
    info["flops_per_frame"] = flops
    save_onnx(proto, out, info)
    return info


def verify_export(onnx_path: str | Path, checkpoint: str | Path, data: str | Path | None = None, max_images: int | None = None, threads: int = 0, progress: bool = True) -> dict[str, Any]:
    """ONNX checker, then ONNX Runtime against the PyTorch checkpoint on real test images."""
    import onnx

    from ..datasets import discover, evenly_spaced
    from ..engines.ort_engine import OrtEngine
    from ..engines.torch_engine import TorchEngine
    from ..evaluate import compare_engines

    onnx_path, checkpoint = Path(onnx_path), Path(checkpoint)
    onnx.checker.check_model(str(onnx_path))
    with TorchEngine(checkpoint) as ref, OrtEngine(onnx_path, threads=threads) as ort_engine:
        if ort_engine.meta.get("source_checkpoint", {}).get("sha256") != sha256_file(checkpoint):
            raise StfpmError(f"{onnx_path} was not exported from {checkpoint} (checkpoint hash differs)")
        data = data or (ref.meta.get("config") or {}).get("data")
        if not data or not Path(data).is_dir():
            raise StfpmError(f"no test data to verify on: pass --data DIR (the checkpoint's data {data!r} is not here)")
        ds = discover(data, seed=(ref.meta.get("config") or {}).get("seed", 0))
        samples = evenly_spaced(ds.test or ds.train, max_images)
        report = compare_engines({"torch": ref.infer, "onnxruntime": ort_engine.infer}, samples, ref.geometry, ref.threshold, "torch", progress)
    report["onnx"] = str(onnx_path)
    report["precision"] = ort_engine.meta.get("precision")
    return report


def parity_ok(report: dict[str, Any], engine: str = "onnxruntime", auroc_tol: float = 1e-4, map_rtol: float = 1e-4) -> tuple[bool, list[str]]:
    """FP32 parity: maps equal to ``map_rtol`` of their range, AUROCs equal to ``auroc_tol``."""
    e = report["engines"][engine]
    problems = []
    span = max(abs(report["map_range"][0]), abs(report["map_range"][1]), 1e-12)
    if e["max_abs_map_diff"] > map_rtol * span:
        problems.append(f"max |map difference| {e['max_abs_map_diff']:.3g} exceeds {map_rtol:g} of the map range {span:.3g}")
    for key in ("delta_image_auroc", "delta_pixel_auroc"):
        d = e.get(key)
        if d is not None and abs(d) > auroc_tol:
            problems.append(f"{key[6:]} differs by {d:+.2e} (tolerance {auroc_tol:g})")
    return not problems, problems


class ParityError(StfpmError):
    """The exported graph does not reproduce its checkpoint; nothing was installed under the real name."""


def export_verified(checkpoint: str | Path, out: str | Path, batch: int = 1, dynamic: bool = False, precision: str = "fp32",
                    verify: bool = True, data: str | Path | None = None, max_images: int | None = None,
                    progress: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Export, verify against the checkpoint, and only then install ``out`` (+ sidecar, verify report).

    The graph is written under a temporary name first. FP32 must pass ``parity_ok``; FP16 gets a
    fidelity report. On failure the graph is kept as ``out.failed`` with its report, and a verified
    ``out`` that was already there is left untouched, so a file named ``model.onnx`` is always one
    that passed. Returns (metadata, verification report or None).
    """
    import os

    from ..fileio import atomic_write_json, sidecar_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.unverified.onnx")
    try:
        info = export_onnx(checkpoint, tmp, batch=batch, dynamic=dynamic, precision=precision)
        report = None
        if verify:
            report = verify_export(tmp, checkpoint, data, max_images, progress=progress)
            report["onnx"] = str(out)
            ok, problems = parity_ok(report) if precision == "fp32" else (True, [])
            report["parity_ok"] = ok
            if not ok:
                failed = out.with_name(out.name + ".failed")
                os.replace(tmp, failed)
                atomic_write_json(failed.with_name(failed.name + ".verify.json"), report)
                raise ParityError("parity check failed: " + "; ".join(problems) + f". The graph was kept as {failed.name}; "
                                  f"{out.name} was not replaced")
        os.replace(tmp, out)
        os.replace(sidecar_path(tmp), sidecar_path(out))
        verify_json = out.with_name(out.name + ".verify.json")
        if report is not None:
            atomic_write_json(verify_json, report)
        else:
            verify_json.unlink(missing_ok=True)  # an older report would describe another graph
        return info, report
    finally:
        tmp.unlink(missing_ok=True)
        sidecar_path(tmp).unlink(missing_ok=True)
