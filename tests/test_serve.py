"""Serving (issue 12): the Triton model repository and its config, parsed with Triton's own protobuf."""

import json

import pytest
from typer.testing import CliRunner

from stfpm_edge.cli import app
from stfpm_edge.errors import StfpmError
from stfpm_edge.serve.repo import RepoOptions, config_pbtxt, metadata_from_parameters, write_repository

runner = CliRunner()


def _parse(text: str):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed (the [serve] extra)")
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def dynamic_onnx(tiny_run, tmp_path_factory):
    from stfpm_edge.export.onnx_export import export_onnx

    run_dir, _ = tiny_run
    path = tmp_path_factory.mktemp("dyn") / "bottle" / "model.onnx"
    path.parent.mkdir()
    export_onnx(run_dir / "model.pt", path, dynamic=True)
    return path


def test_onnx_repository_config_parses_with_tritons_protobuf(dynamic_onnx, tmp_path):
    folder = write_repository(dynamic_onnx, tmp_path / "repo", "bottle", RepoOptions(max_batch=16, queue_delay_us=250, instances=2, kind="cpu"))
    assert (folder / "1" / "model.onnx").read_bytes() == dynamic_onnx.read_bytes()
    cfg = _parse((folder / "config.pbtxt").read_text())
    meta = json.loads(dynamic_onnx.with_name("model.onnx.json").read_text())
    h, w = meta["geometry"]["height"], meta["geometry"]["width"]
    assert cfg.name == "bottle" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("frames", [h, w, 3])] and cfg.input[0].data_type == 2  # TYPE_UINT8
    outs = {o.name: o for o in cfg.output}
    assert list(outs["anomaly_map"].dims) == [1, h, w]
    assert list(outs["score"].dims) == [1] and list(outs["score"].reshape.shape) == [] and outs["score"].HasField("reshape")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250 and 16 in cfg.dynamic_batching.preferred_batch_size
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == 2  # KIND_CPU
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    got = metadata_from_parameters({k: {"string_value": v} for k, v in params.items()})
    assert got["geometry"] == meta["geometry"] and got["threshold"]["image"] == meta["threshold"]["image"]
    assert params["colour_order"] == "BGR" and params["checkpoint_sha256"] == meta["source_checkpoint"]["sha256"]
    assert float(params["threshold"]) == meta["threshold"]["image"]


def test_tensorrt_variant_config_parses_and_needs_a_profile(tmp_path):
    meta = {"geometry": {"height": 64, "width": 96, "mode": "squash"}, "threshold": {"image": 0.25}, "input": {"colour_order": "BGR"}}
    cfg = _parse(config_pbtxt("line-7_cam.2", "tensorrt_plan", meta, RepoOptions(max_batch=4, kind="gpu")))
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 4 and cfg.instance_group[0].kind == 1  # KIND_GPU
    assert list(cfg.input[0].dims) == [64, 96, 3] and list(cfg.output[0].dims) == [1, 64, 96]
    engine = tmp_path / "model_fp16.engine"
    engine.write_bytes(b"ENGINE")
    (tmp_path / "model_fp16.engine.json").write_text(json.dumps({"build_options": {"max_batch": 2}, "model": meta}))
    with pytest.raises(StfpmError, match="built for batches up to 2"):
        write_repository(engine, tmp_path / "repo", "m", RepoOptions(max_batch=4))
    folder = write_repository(engine, tmp_path / "repo", "m", RepoOptions(max_batch=2))
    assert (folder / "1" / "model.plan").read_bytes() == b"ENGINE" and _parse((folder / "config.pbtxt").read_text()).max_batch_size == 2


def test_static_graph_names_and_options_are_refused_clearly(tiny_run, dynamic_onnx, tmp_path):
    from stfpm_edge.export.onnx_export import export_onnx

    static = tmp_path / "static.onnx"
    export_onnx(tiny_run[0] / "model.pt", static)
    with pytest.raises(StfpmError, match="--dynamic"):
        write_repository(static, tmp_path / "repo", "m", RepoOptions())
    for bad in ("../x", "a b", ""):
        with pytest.raises(StfpmError, match="model name"):
            write_repository(dynamic_onnx, tmp_path / "repo", bad, RepoOptions())
    for opts in (RepoOptions(max_batch=0), RepoOptions(kind="tpu"), RepoOptions(instances=0)):
        with pytest.raises(StfpmError):
            write_repository(dynamic_onnx, tmp_path / "repo", "m", opts)


def test_cli_writes_a_repository_from_a_checkpoint_and_replaces_a_model_whole(tiny_run, dynamic_onnx, tmp_path):
    run_dir, _ = tiny_run
    repo = tmp_path / "repo"
    result = runner.invoke(app, ["triton-repo", str(run_dir / "model.pt"), str(dynamic_onnx), "--name", "a", "--name", "b", "--out", str(repo),
                                 "--max-batch", "4"])
    assert result.exit_code == 0, result.output
    for n in ("a", "b"):
        assert _parse((repo / n / "config.pbtxt").read_text()).max_batch_size == 4 and (repo / n / "1" / "model.onnx").is_file()
    result = runner.invoke(app, ["triton-repo", str(dynamic_onnx), "--name", "b", "--out", str(repo), "--max-batch", "2"])
    assert result.exit_code == 0 and _parse((repo / "b" / "config.pbtxt").read_text()).max_batch_size == 2
    assert sorted(p.name for p in repo.iterdir()) == ["a", "b"]  # no staging or old copies left
    result = runner.invoke(app, ["triton-repo", str(dynamic_onnx), str(dynamic_onnx), "--out", str(repo)])
    assert result.exit_code == 2 and "share the name" in result.output
