"""Export, parity, metadata, engine dispatch, the torch-free deploy path, INT8/FP16 variants, bad input."""

import json

import onnx
import pytest
import torch
from typer.testing import CliRunner

from stfpm_edge.cli import app
from stfpm_edge.errors import StfpmError
from stfpm_edge.export.onnx_export import export_onnx, parity_ok, verify_export
from stfpm_edge.fileio import sidecar_path

runner = CliRunner()


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


def test_blur_topk_and_level_weights_are_inside_the_graph(tiny_run, synthetic_mvtec, tmp_path):
    """Post-processing lives in the model, so the exported graph reproduces it (deploy = evaluation)."""
    from stfpm_edge.checkpoint import load_checkpoint, save_checkpoint
    from stfpm_edge.export.onnx_export import export_verified

    run_dir, _ = tiny_run
    model, meta = load_checkpoint(run_dir / "model.pt")
    levels = len(meta["layers"])
    meta["map_post"] = {"blur_sigma": 3.0, "topk_fraction": 0.01, "level_weights": [0.5] * (levels - 1) + [1.0]}
    save_checkpoint(tmp_path / "post.pt", model, meta)
    _, report = export_verified(tmp_path / "post.pt", tmp_path / "post.onnx", data=synthetic_mvtec, progress=False)
    assert report["parity_ok"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "post.onnx")).graph.node}
    assert "TopK" in ops and "Pow" in ops


def test_failed_verification_never_replaces_a_verified_model(exported, tiny_run, synthetic_mvtec, tmp_path, monkeypatch):
    import stfpm_edge.export.onnx_export as ox

    ckpt, _ = exported
    out = tmp_path / "model.onnx"
    ox.export_verified(ckpt, out, data=synthetic_mvtec, progress=False)
    good = out.read_bytes()
    good_report = json.loads(out.with_name("model.onnx.verify.json").read_text())
    assert good_report["parity_ok"]

    def broken(report, *a, **k):
        return False, ["injected mismatch"]

    monkeypatch.setattr(ox, "parity_ok", broken)
    with pytest.raises(ox.ParityError, match="was not replaced"):
        ox.export_verified(ckpt, out, data=synthetic_mvtec, progress=False)
    assert out.read_bytes() == good  # the verified graph is untouched
    assert json.loads(out.with_name("model.onnx.verify.json").read_text())["parity_ok"]
    assert (tmp_path / "model.onnx.failed").is_file()
    assert not [p for p in tmp_path.iterdir() if "unverified" in p.name]
    with pytest.raises(StfpmError, match="no test data"):  # a bad --data: also nothing replaced
        ox.export_verified(ckpt, out, data=tmp_path / "nowhere", progress=False)
    assert out.read_bytes() == good
