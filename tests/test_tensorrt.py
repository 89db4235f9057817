"""TensorRT build logic against fake 8.6 / 10.x / 11.x modules; GPU tests live in test_gpu.py."""

import json

import pytest
from typer.testing import CliRunner

from stfpm_edge.cli import app
from stfpm_edge.engines.trt_build import (
    BuildOptions,
    build_engine,
    detect_features,
    rebuild_command,
    stale_reasons,
)
from stfpm_edge.errors import BackendUnavailable, StfpmError
from stfpm_edge.onnxmeta import is_head_node
from tests.fake_tensorrt import make_fake_trt

GPU = {"name": "NVIDIA Test GPU", "compute_capability": "8.7", "integrated": True}


@pytest.fixture(scope="module")
def variants(tiny_run, tmp_path_factory):
    from stfpm_edge.calib import calibrate_int8
    from stfpm_edge.export.onnx_export import export_onnx

    run_dir, _ = tiny_run
    d = tmp_path_factory.mktemp("variants")
    export_onnx(run_dir / "model.pt", d / "model.onnx")
    export_onnx(run_dir / "model.pt", d / "model_fp16.onnx", precision="fp16")
    data = json.loads((run_dir / "config.json").read_text())["data"]
    calibrate_int8(d / "model.onnx", d / "model_int8.onnx", data, n_images=4, progress=False)
    return d


def _flags(trt):
    return [c[1] for c in trt.calls if c[0] == "set_flag"]


def _network_flags(trt):
    return [c[1] for c in trt.calls if c[0] == "create_network"][0]


def test_feature_detection_per_version():
    f86, f10, f11 = (detect_features(make_fake_trt(v)) for v in ("8.6.2", "10.3.0", "11.4.0"))
    assert (f86.explicit_batch_flag, f86.weak_typing) == (True, True)
    assert (f10.explicit_batch_flag, f10.weak_typing, f10.strongly_typed_flag) == (False, True, True)
    assert (f11.explicit_batch_flag, f11.weak_typing) == (False, False)


@pytest.mark.parametrize("version", ["8.6.2", "10.3.0"])
def test_fp16_with_builder_flag_keeps_head_in_fp32(variants, tmp_path, version):
    trt = make_fake_trt(version)
    path, side = build_engine(variants / "model.onnx", tmp_path, BuildOptions("fp16"), trt=trt, gpu=GPU)
    expected_net_flags = 1 << 0 if version.startswith("8") else 0  # EXPLICIT_BATCH only below 10
    assert _network_flags(trt) == expected_net_flags
    assert _flags(trt) == [trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS]
    head = [l for l in trt.network.layers if is_head_node(l.name)]
    body = [l for l in trt.network.layers if not is_head_node(l.name)]
    assert head and body
    assert all(l.precision == trt.float32 and l.output_types == {0: trt.float32} for l in head)
    assert all(l.precision is None for l in body)
    assert trt.config.pool["WORKSPACE"] == 1024 << 20
    assert path.read_bytes() == b"ENGINE" + version.encode()
    assert side["tensorrt_version"] == version and side["gpu"] == GPU and side["precision"] == "fp16"
    assert json.loads(path.with_name(path.name + ".json").read_text())["onnx"]["sha256"] == side["onnx"]["sha256"]


def test_fp16_on_11_is_strongly_typed_from_the_fp16_graph(variants, tmp_path):
    trt = make_fake_trt("11.4.0")
    with pytest.raises(StfpmError, match="--precision fp16"):
        build_engine(variants / "model.onnx", tmp_path, BuildOptions("fp16"), trt=trt, gpu=GPU)
    trt = make_fake_trt("11.4.0")
    path, side = build_engine(variants / "model_fp16.onnx", tmp_path, BuildOptions("fp16"), trt=trt, gpu=GPU)
    assert _flags(trt) == [] and _network_flags(trt) == 0  # no precision flags exist; no removed creation flags
    assert side["build_plan"]["strongly_typed"] is True
    assert all(l.precision is None for l in trt.network.layers)


@pytest.mark.parametrize("version,flags", [("8.6.2", ["INT8"]), ("10.3.0", ["INT8"]), ("11.4.0", [])])
def test_int8_from_qdq_graph(variants, tmp_path, version, flags):
    trt = make_fake_trt(version)
    with pytest.raises(StfpmError, match="calibrate"):
        build_engine(variants / "model.onnx", tmp_path, BuildOptions("int8"), trt=trt, gpu=GPU)
    trt = make_fake_trt(version)
    build_engine(variants / "model_int8.onnx", tmp_path, BuildOptions("int8"), trt=trt, gpu=GPU)
    assert _flags(trt) == [getattr(trt.BuilderFlag, f) for f in flags]


def test_failed_build_parser_errors_and_dla_on_desktop_are_clear(variants, tmp_path):
    with pytest.raises(StfpmError, match="failed to build"):
        build_engine(variants / "model.onnx", tmp_path, BuildOptions("fp16"), trt=make_fake_trt("10.3.0", build_fails=True), gpu=GPU)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    (tmp_path / "bad.onnx.json").write_text(json.dumps({"precision": "fp32"}))
    with pytest.raises(StfpmError, match="cannot parse"):
        build_engine(bad, tmp_path, BuildOptions("fp32"), trt=make_fake_trt("10.3.0"), gpu=GPU)
    with pytest.raises(StfpmError, match="no DLA cores"):
        build_engine(variants / "model.onnx", tmp_path, BuildOptions("fp16", dla_core=0), trt=make_fake_trt("8.6.2"), gpu={"name": "RTX 4090", "compute_capability": "8.9"})
    trt = make_fake_trt("8.6.2", dla_cores=2)
    build_engine(variants / "model.onnx", tmp_path, BuildOptions("fp16", dla_core=1), trt=trt, gpu=GPU)
    assert trt.config.default_device_type == "DLA" and trt.config.DLA_core == 1
    assert trt.BuilderFlag.GPU_FALLBACK in _flags(trt)


def test_timing_cache_is_reused_and_saved(variants, tmp_path):
    cache = tmp_path / "t.cache"
    build_engine(variants / "model.onnx", tmp_path, BuildOptions("fp16", timing_cache=str(cache)), trt=make_fake_trt("10.3.0"), gpu=GPU)
    assert cache.read_bytes() == b"timing-cache:"
    build_engine(variants / "model.onnx", tmp_path, BuildOptions("fp16", timing_cache=str(cache)), trt=make_fake_trt("10.3.0"), gpu=GPU)
    assert cache.read_bytes() == b"timing-cache:timing-cache:"


def test_stale_sidecar_detection(variants, tmp_path):
    _, side = build_engine(variants / "model.onnx", tmp_path, BuildOptions("fp16"), trt=make_fake_trt("10.3.0"), gpu=GPU)
    sha = side["onnx"]["sha256"]
    assert stale_reasons(side, "10.3.0", GPU, sha) == []
    assert "TensorRT 10.3.0" in stale_reasons(side, "10.4.0", GPU, sha)[0]
    assert "Orin" in stale_reasons(side, "10.3.0", {"name": "Orin", "compute_capability": "8.7"}, sha)[0]
    assert "changed" in stale_reasons(side, "10.3.0", GPU, "0" * 64)[0]
    assert rebuild_command(side).startswith("stfpm-edge build ") and "--precision fp16" in rebuild_command(side)


def test_without_tensorrt_build_and_open_say_what_to_install(variants, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    res = CliRunner().invoke(app, ["build", str(variants / "model.onnx")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = [l for l in res.output.strip().splitlines() if l]
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0] and "pip install" in lines[0]
    from stfpm_edge.engines import open_engine

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    with pytest.raises(BackendUnavailable, match="TensorRT"):
        open_engine(engine)


def test_trtexec_equivalent_commands(variants):
    from stfpm_edge.engines.trt_build import trtexec_command

    weak = trtexec_command(variants / "model.onnx", "fp16", weak_typing=True)
    assert "--fp16" in weak and "--precisionConstraints=obey" in weak
    # the default student compares standardised features by their mean squared difference: that distance stays FP32
    assert "/model/Sub:fp32" in weak and "/model/Pow:fp32" in weak and "/model/ReduceMean:fp32" in weak
    assert "/model/teacher/" not in weak and weak.endswith(":fp32")
    assert trtexec_command(variants / "model_int8.onnx", "int8", True).endswith("--saveEngine=model_int8.engine --int8")
    strong = trtexec_command(variants / "model_fp16.onnx", "fp16", weak_typing=False)
    assert strong == f"trtexec --onnx={variants / 'model_fp16.onnx'} --saveEngine=model_fp16.engine"


def test_dynamic_graph_gets_an_optimisation_profile_for_tritons_batcher(tiny_run, variants, tmp_path):
    from stfpm_edge.export.onnx_export import export_onnx
    from stfpm_edge.serve.repo import RepoOptions, write_repository

    dyn = tmp_path / "model.onnx"
    export_onnx(tiny_run[0] / "model.pt", dyn, dynamic=True)
    trt = make_fake_trt("10.3.0")
    path, side = build_engine(dyn, tmp_path / "e", BuildOptions("fp16", max_batch=8), trt=trt, gpu=GPU)
    (lo, opt, hi), = [p.shapes["frames"] for p in trt.config.profiles]
    assert lo[0] == 1 and opt[0] == hi[0] == 8 and lo[1:] == hi[1:] == (64, 64, 3)
    assert side["build_options"]["max_batch"] == 8
    folder = write_repository(path, tmp_path / "repo", "m", RepoOptions(max_batch=8))
    assert (folder / "1" / "model.plan").is_file()
    with pytest.raises(StfpmError, match="--dynamic"):
        build_engine(variants / "model.onnx", tmp_path / "e2", BuildOptions("fp16", max_batch=4), trt=make_fake_trt("10.3.0"), gpu=GPU)
