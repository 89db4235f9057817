"""INT8 calibration: symmetric Q/DQ for TensorRT, head kept in FP32."""


import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from stfpm_edge.engines import open_engine
from stfpm_edge.errors import StfpmError

runner = CliRunner()


def test_int8_tensorrt_variant_is_symmetric_qdq(exported, tmp_path, synthetic_mvtec):
    from stfpm_edge.calib import calibrate_int8

    _, path = exported
    out = tmp_path / "int8.onnx"
    meta = calibrate_int8(path, out, synthetic_mvtec, n_images=8, target="tensorrt", progress=False)
    assert meta["precision"] == "int8" and meta["int8"]["target"] == "tensorrt"
    proto = onnx.load(str(out))
    q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert q, "no Q/DQ nodes"
    inits = {i.name: i for i in proto.graph.initializer}
    from onnx import numpy_helper

    for n in q:
        zp = numpy_helper.to_array(inits[n.input[2]])
        assert zp.dtype == np.int8 and not zp.any(), n.name  # symmetric: zero point 0
    # the head computes in FP32: none of its results is quantised again (the backbone features
    # entering it may be, as the INT8 backbone's outputs)
    from stfpm_edge.onnxmeta import is_head_node

    head_outputs = {o for n in proto.graph.node if is_head_node(n.name) and n.op_type in ("ReduceL2", "Div", "Sub", "Pow", "ReduceSum", "Resize", "Mul") for o in n.output}
    assert head_outputs and not any(n.input[0] in head_outputs for n in q)
    with open_engine(out) as e:
        m, s = e.infer(np.zeros((2, 64, 64, 3), np.uint8))
    assert m.shape == (2, 64, 64) and np.isfinite(s).all()
    with pytest.raises(StfpmError, match="FP32"):
        calibrate_int8(out, tmp_path / "again.onnx", synthetic_mvtec, n_images=4)


def test_calibration_uses_the_models_own_split_and_writes_nothing_beside_the_caller(exported, tmp_path, synthetic_mvtec, monkeypatch):
    """ONNX Runtime's quantiser may drop external-data files into the working directory; none may stay."""
    from stfpm_edge.calib import int8
    from stfpm_edge.datasets import discover, heldout_splits

    _, path = exported
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    picked = []
    real = int8.load_images
    monkeypatch.setattr(int8, "load_images", lambda samples, *a, **k: (picked.extend(samples), real(samples, *a, **k))[1])
    int8.calibrate_int8(path, tmp_path / "cpu.onnx", synthetic_mvtec, n_images=100, target="cpu", progress=False)
    import json

    cfg = json.loads(path.with_name(path.name + ".json").read_text())["config"]
    train, val, calib = heldout_splits(discover(synthetic_mvtec).train, cfg["val_fraction"], cfg["calib_fraction"], cfg["seed"])
    assert calib  # the default holds out a calibration split too
    assert {s.path for s in picked} == {s.path for s in train}  # never the held-out images
    assert list(work.iterdir()) == []
