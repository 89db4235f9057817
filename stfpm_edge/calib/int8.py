"""INT8 variants of the fused graph, calibrated on good training images with ONNX Runtime's
``quantize_static`` in QDQ format. The preprocessing and the anomaly-map head stay in FP32.

Two targets, because the two runtimes want different INT8:

- ``tensorrt``: symmetric activations and weights (zero point 0), per-channel weights: the only
  explicit-quantisation form TensorRT accepts.
- ``cpu``: unsigned asymmetric activations (what ONNX Runtime's fast x86 kernels use) and signed
  per-channel weights.

Calibration uses min/max ranges on purpose: anomalies are exactly the activations that exceed what
good images produce, and percentile or entropy clipping would saturate them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets import discover, evenly_spaced, heldout_splits, load_images
from ..errors import StfpmError
from ..geometry import Geometry
from ..onnxmeta import is_head_node, save_onnx

TARGETS = ("tensorrt", "cpu")


class _FrameReader:
    """Feeds fitted uint8 frames to the calibrator in the graph's batch size."""

    def __init__(self, frames: np.ndarray, input_name: str, batch: int):
        self._batches = [frames[i : i + batch] for i in range(0, len(frames) - batch + 1, batch)]
        self._name = input_name
        self._i = 0

    def get_next(self):
        if self._i >= len(self._batches):
            return None
        self._i += 1
        return {self._name: self._batches[self._i - 1]}

    def rewind(self):
        self._i = 0


def calibrate_int8(onnx_fp32: str | Path, out: str | Path, data: str | Path | None = None, n_images: int = 64, target: str = "tensorrt", progress: bool = True) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..engines.ort_engine import OrtEngine

    if target not in TARGETS:
        raise StfpmError(f"target {target!r} is not one of {', '.join(TARGETS)}")
    onnx_fp32, out = Path(onnx_fp32), Path(out)
    with OrtEngine(onnx_fp32) as fp32:
        meta = dict(fp32.meta)
        batch = fp32.static_batch or 1
        input_name = fp32.input_name
    if meta.get("precision") != "fp32":
        raise StfpmError(f"{onnx_fp32}: calibrate an FP32 export (this one is {meta.get('precision')})")
    data = data or ((meta.get("dataset") or {}).get("root"))
    if data is None:
        raise StfpmError("pass --data DIR: the good training images to calibrate on")
    # calibrate on the model's own training split (its config travels in the metadata)
    cfg = meta.get("config") or {}
    seed = int(cfg.get("seed", 0))
    ds = discover(data, seed=seed)
    train = (heldout_splits(ds.train, float(cfg.get("val_fraction", 0.2)), float(cfg.get("calib_fraction", 0.0)), seed)[0]
             if len(ds.train) > 1 else ds.train)
    picked = evenly_spaced(train, n_images)
    frames, _ = load_images(picked, Geometry(**meta["geometry"]), progress=progress, desc="calibration images")
    if len(frames) < batch:
        raise StfpmError(f"need at least {batch} calibration images for a batch-{batch} graph")

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant = Path(tmp) / "int8.onnx"
        # shape inference only: graph optimisation would rename the nodes we keep in FP32
        quant_pre_process(str(onnx_fp32), str(pre), skip_optimization=True, skip_symbolic_shape=True)
        head = [n.name for n in onnx.load(str(pre)).graph.node if is_head_node(n.name)]
        symmetric = target == "tensorrt"
        quantize_static(
            str(pre), str(quant), _FrameReader(frames, input_name, batch),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=head,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )
        proto = onnx.load(str(quant))
    meta.update({
        "precision": "int8",
        "int8": {"target": target, "format": "QDQ", "activations": "int8 symmetric" if symmetric else "uint8 asymmetric",
                 "weights": "int8 symmetric per-channel", "calibration": "minmax", "calibration_images": len(frames),
                 "calibration_data": str(data), "fp32_source": str(onnx_fp32), "kept_fp32_nodes": len(head)},
    })
    save_onnx(proto, out, meta)
    return meta


def verify_int8(onnx_fp32: str | Path, onnx_int8: str | Path, data: str | Path | None = None, max_images: int | None = None) -> dict[str, Any]:
    """The INT8 graph against its FP32 source on the test images; the report is also written beside it."""
    from ..engines.ort_engine import OrtEngine
    from ..evaluate import compare_engines
    from ..fileio import atomic_write_json

    onnx_int8 = Path(onnx_int8)
    with OrtEngine(onnx_fp32) as fp32, OrtEngine(onnx_int8) as int8:
        ds = discover(data or int8.meta["int8"]["calibration_data"])
        samples = evenly_spaced(ds.test, max_images)
        report = compare_engines({"fp32": fp32.infer, "int8": int8.infer}, samples, fp32.geometry, fp32.threshold, "fp32")
    atomic_write_json(onnx_int8.with_name(onnx_int8.name + ".verify.json"), report)
    return report
