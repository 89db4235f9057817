"""Export, parity, metadata, engine dispatch, the torch-free deploy path, INT8/FP16 variants, bad input."""

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from stfpm_edge.cli import app
from stfpm_edge.engines import FrameError, open_engine
from stfpm_edge.errors import ModelFileError, StfpmError
from stfpm_edge.export.onnx_export import export_onnx, parity_ok, verify_export
from stfpm_edge.fileio import sidecar_path
from tests.conftest import run_without_modules

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    run_dir, _ = tiny_run
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(run_dir / "model.pt", out)
    return run_dir / "model.pt", out


def test_fused_graph_io_and_metadata(exported):
    ckpt, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == 17
    inp = proto.graph.input[0]
    assert inp.name == "frames" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 64, 64, 3]
    assert [o.name for o in proto.graph.output] == ["anomaly_map", "score", "normalized_score"]
    # TF-"SAME" padding frozen for the fixed model size: nothing in the backbones reads the input's
    # shape at run time (the pads are computed from constants only)
    ops = {n.op_type for n in proto.graph.node if n.name.startswith(("/model/teacher/", "/model/student/"))}
    assert "Pad" in ops and not ops & {"Shape", "Ceil", "Gather"}, ops
    # an explicit zero pad value lets ONNX Runtime fold each Pad into its Conv (measured: without
    # it, 7 Pads stay and inference is ~30% slower)
    pads = [n for n in proto.graph.node if n.op_type == "Pad" and n.name.startswith("/model/teacher/")]
    assert pads and all(len(n.input) == 3 and n.input[2] for n in pads)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["stfpm_edge"])
    sidecar = json.loads(sidecar_path(path).read_text())
    from stfpm_edge.checkpoint import read_checkpoint
    from stfpm_edge.fileio import sha256_file

    ck = read_checkpoint(ckpt)["meta"]
    for m in (meta, sidecar):
        assert m["geometry"] == ck["geometry"] and m["threshold"] == ck["threshold"]
        assert m["input"]["colour_order"] == "BGR" and m["normalization"]["mean"] == [0.5, 0.5, 0.5]
        assert m["source_checkpoint"]["sha256"] == sha256_file(ckpt)
    assert sidecar["onnx_sha256"] == sha256_file(path)


def test_onnx_matches_checkpoint(exported, synthetic_mvtec):
    ckpt, path = exported
    report = verify_export(path, ckpt, synthetic_mvtec, progress=False)
    ok, problems = parity_ok(report)
    assert ok, problems
    e = report["engines"]["onnxruntime"]
    assert e["max_abs_map_diff"] < 1e-4 * max(report["map_range"][1], 1e-12)
    assert e["delta_image_auroc"] == pytest.approx(0.0, abs=1e-4)


def test_parity_check_catches_a_different_model(exported, synthetic_mvtec, tmp_path):
    ckpt, path = exported
    report = verify_export(path, ckpt, synthetic_mvtec, progress=False)
    report["engines"]["onnxruntime"]["max_abs_map_diff"] = report["map_range"][1]  # as a broken graph would
    ok, problems = parity_ok(report)
    assert not ok and "map" in problems[0]


def test_suffix_dispatch_and_same_answers(exported):
    ckpt, path = exported
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    with open_engine(ckpt) as t, open_engine(path) as o:
        assert (t.name, o.name) == ("torch", "onnxruntime")
        (tm, ts), (om, os_) = t.infer(frames), o.infer(frames)  # 3 frames through a batch-1 graph
    assert tm.shape == om.shape == (3, 64, 64) and ts.shape == os_.shape == (3,)
    np.testing.assert_allclose(om, tm, rtol=1e-4, atol=1e-6)
    with pytest.raises(ModelFileError, match="unknown model type"):
        open_engine(path.with_suffix(".tflite"))


def test_dynamic_batch_and_normalized_score(exported, tmp_path):
    ckpt, _ = exported
    out = tmp_path / "dyn.onnx"
    meta = export_onnx(ckpt, out, dynamic=True)
    assert meta["batch"] == "dynamic"
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    frames = np.full((5, 64, 64, 3), 128, np.uint8)
    amap, score, norm = sess.run(None, {"frames": frames})
    assert amap.shape == (5, 1, 64, 64) and score.shape == (5,)
    thr = meta["threshold"]["image"]
    np.testing.assert_allclose(norm, np.clip(0.5 * score / thr, 0, 1), rtol=1e-5)


def test_onnx_runtime_path_does_not_import_torch(exported):
    _, path = exported
    code = (
        "import numpy as np\n"
        "from stfpm_edge.engines import open_engine\n"
        f"e = open_engine(r'{path}')\n"
        "m, s = e.infer(np.zeros((64, 64, 3), np.uint8))\n"
        "assert m.shape == (1, 64, 64)\n"
        "import stfpm_edge.calib, stfpm_edge.engines.trt_build, stfpm_edge.engines.trt_engine\n"
    )
    run_without_modules(code, ("torch", "timm", "torchvision", "tensorrt"))


def test_wrong_frames_are_clear_errors(exported):
    _, path = exported
    with open_engine(path) as e:
        with pytest.raises(FrameError, match="uint8"):
            e.infer(np.zeros((1, 64, 64, 3), np.float32))
        with pytest.raises(FrameError, match=r"\[N, 64, 64, 3\]"):
            e.infer(np.zeros((1, 128, 64, 3), np.uint8))
        with pytest.raises(FrameError):
            e.infer(np.zeros((1, 64, 64), np.uint8))


def test_onnx_without_our_metadata_is_refused(exported, tmp_path):
    _, path = exported
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ModelFileError, match="no stfpm-edge metadata"):
        open_engine(bare)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x01garbage")
    with pytest.raises(ModelFileError, match="cannot load"):
        open_engine(garbage)


def test_export_refuses_foreign_or_truncated_checkpoints(exported, tmp_path):
    ckpt, _ = exported
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    for bad in (foreign, truncated):
        result = runner.invoke(app, ["export", str(bad), "--out", str(tmp_path / "x.onnx")])
        assert result.exit_code == 2 and bad.name in result.output and "Traceback" not in result.output
        assert not (tmp_path / "x.onnx").exists()


def test_fp16_variant_keeps_head_in_fp32(exported, tmp_path, synthetic_mvtec):
    ckpt, _ = exported
    out = tmp_path / "fp16.onnx"
    export_onnx(ckpt, out, precision="fp16")
    proto = onnx.load(str(out))
    conv_types = {i.data_type for i in proto.graph.initializer if "conv" in i.name.lower() or i.name.startswith("onnx::Conv")}
    assert onnx.TensorProto.FLOAT16 in conv_types
    head_ops = [n for n in proto.graph.node if n.op_type in ("ReduceL2", "Resize", "ReduceMax")]
    assert head_ops and all(not n.name.startswith(("/model/teacher/", "/model/student/")) for n in head_ops)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in proto.graph.output)
    report = verify_export(out, ckpt, synthetic_mvtec, progress=False)
    e = report["engines"]["onnxruntime"]
    assert 0 < e["max_abs_map_diff"] < 0.05 * report["map_range"][1]  # FP16 rounding, not a different model


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
