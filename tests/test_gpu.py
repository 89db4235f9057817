"""GPU checks: TensorRT FP16 and INT8 engines against ONNX Runtime FP32 on real bottle images.

Marked ``gpu``; skipped unless TensorRT, pycuda and an NVIDIA GPU are present. Run them all, with
the latency benchmark, through ``scripts/gpu_check.sh``. ``STFPM_GPU_MODEL`` may name a trained
model.pt (otherwise a short CPU training on bottle makes one).
"""

import json
import os
from pathlib import Path

import pytest

from tests.conftest import bottle_or_skip

pytestmark = pytest.mark.gpu

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU tests need tensorrt and pycuda)")
cuda = pytest.importorskip("pycuda.driver", reason="pycuda is not installed")


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    from stfpm_edge.calib import calibrate_int8
    from stfpm_edge.export.onnx_export import export_onnx

    try:
        cuda.init()
        assert cuda.Device.count() > 0
    except Exception as exc:
        pytest.skip(f"no usable NVIDIA GPU: {exc}")
    bottle = bottle_or_skip()
    d = tmp_path_factory.mktemp("gpu")
    ckpt = Path(os.environ["STFPM_GPU_MODEL"]) if os.environ.get("STFPM_GPU_MODEL") else None
    if ckpt is None:
        from stfpm_edge.config import load_config
        from stfpm_edge.train import train

        run_dir, _ = train(load_config(None, dict(data=str(bottle), out=str(d / "run"), epochs=10, overlays=0)), progress=False)
        ckpt = run_dir / "model.pt"
    export_onnx(ckpt, d / "model.onnx")
    export_onnx(ckpt, d / "model_fp16.onnx", precision="fp16")
    calibrate_int8(d / "model.onnx", d / "model_int8.onnx", bottle, progress=False)
    return d, bottle


@pytest.mark.parametrize("precision,auroc_tol", [("fp16", 0.001), ("int8", 0.01)])
def test_engine_matches_onnxruntime_fp32(onnx_models, precision, auroc_tol):
    from stfpm_edge.datasets import discover
    from stfpm_edge.engines import open_engine
    from stfpm_edge.engines.trt_build import BuildOptions, build_engine, detect_features
    from stfpm_edge.evaluate import compare_engines

    d, bottle = onnx_models
    weak = detect_features(trt).weak_typing
    src = {"fp16": "model.onnx" if weak else "model_fp16.onnx", "int8": "model_int8.onnx"}[precision]
    engine_path, side = build_engine(d / src, d / "engines", BuildOptions(precision))
    with open_engine(d / "model.onnx") as ref, open_engine(engine_path) as eng:
        report = compare_engines({"ort_fp32": ref.infer, f"trt_{precision}": eng.infer}, discover(bottle).test, ref.geometry, ref.threshold, "ort_fp32", progress=False)
    e = report["engines"][f"trt_{precision}"]
    print(json.dumps({"precision": precision, "tensorrt": side["tensorrt_version"], "gpu": side["gpu"], "max_abs_map_diff": e["max_abs_map_diff"],
                      "delta_image_auroc": e["delta_image_auroc"], "delta_pixel_auroc": e["delta_pixel_auroc"], "verdict_flips": e.get("verdict_flips")}))
    assert abs(e["delta_image_auroc"]) <= auroc_tol
    assert abs(e["delta_pixel_auroc"]) <= auroc_tol


def test_engine_context_released_cleanly(onnx_models):
    import numpy as np

    from stfpm_edge.engines import open_engine
    from stfpm_edge.engines.trt_build import BuildOptions, build_engine

    d, _ = onnx_models
    path, _ = build_engine(d / "model.onnx", d / "engines", BuildOptions("fp32"))
    for _ in range(2):  # open, use and close twice in one process: the context stack must be empty after each
        with open_engine(path) as eng:
            m, s = eng.infer(np.zeros((3, eng.geometry.height, eng.geometry.width, 3), np.uint8))
            assert m.shape[0] == 3 and set(eng.device_timings()) == {"h2d", "compute", "d2h"}
        assert cuda.Context.get_current() is None
