"""Engines behind one interface: suffix dispatch, option routing, batches, the torch-free ONNX Runtime path, clear errors."""


import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from stfpm_edge.engines import FrameError, open_engine
from stfpm_edge.errors import ModelFileError, StfpmError
from stfpm_edge.export.onnx_export import export_onnx
from tests.conftest import run_without_modules

runner = CliRunner()


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


def test_open_engine_routes_options_and_refuses_foreign_ones(exported):
    ckpt, path = exported
    with open_engine(path, threads=1, zero_copy=False, build_if_stale=False) as e:  # defaults of other backends: fine
        assert e.name == "onnxruntime" and e.device_timings() == {}
    with pytest.raises(StfpmError, match=r"zero_copy do not apply to onnxruntime models \(\.onnx\); they apply to tensorrt"):
        open_engine(path, zero_copy=True)
    with pytest.raises(StfpmError, match="build_if_stale"):
        open_engine(ckpt, build_if_stale=True)
    with pytest.raises(ModelFileError, match="not found"):
        open_engine(path.with_name("missing.onnx"), threads=2)


def test_foreign_graph_with_our_metadata_and_empty_files_are_clear_errors(exported, tmp_path):
    """An ONNX file whose metadata claims to be ours but whose graph is not; an empty file for build."""
    import onnx
    from onnx import TensorProto, helper

    from stfpm_edge.engines.trt_build import build_engine

    _, path = exported
    meta_value = {p.key: p.value for p in onnx.load(str(path)).metadata_props}["stfpm_edge"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "foreign", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="stfpm_edge", value=meta_value)
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(ModelFileError, match="not an stfpm-edge graph"):
        open_engine(foreign)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        build_engine(empty, tmp_path / "engines")


def test_a_foreign_option_is_named_without_importing_torch(exported):
    _, onnx_path = exported
    code = (
        "from stfpm_edge.engines import engine_options\n"
        "from stfpm_edge.errors import StfpmError\n"
        "try:\n"
        f"    engine_options(r'{onnx_path}', zero_copy=True)\n"
        "    raise SystemExit('accepted')\n"
        "except StfpmError as exc:\n"
        "    assert 'tensorrt (.engine, .plan)' in str(exc), exc\n"
    )
    run_without_modules(code, ("torch",))
