"""Serving (issue 12): the Triton model repository and its config, parsed with Triton's own protobuf."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
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


def test_serve_options_are_checked_before_anything_starts(dynamic_onnx):
    from stfpm_edge.serve.server import ServeOptions

    for opts, message in ((ServeOptions(host="192.0.2.1", shm=True), "loopback|127.0.0.1"), (ServeOptions(http_port=9, grpc_port=9), "must differ"),
                          (ServeOptions(name="a/b"), "model name"), (ServeOptions(max_batch=0), "max-batch")):
        with pytest.raises(StfpmError, match=message):
            opts.check()


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


# -- a live server: `stfpm-edge serve` (PyTriton's bundled tritonserver) on loopback, and the Triton client engine

class Server:
    def __init__(self, model, tmp_path, name="stfpm", max_batch=8):
        from tests.line_peers import free_port

        self.model, self.name, self.log = model, name, tmp_path / f"serve-{name}.log"
        self.ports = [free_port() for _ in range(3)]
        self.cmd = [sys.executable, "-m", "stfpm_edge.cli", "serve", str(model), "--name", name, "--http-port", str(self.ports[0]),
                    "--grpc-port", str(self.ports[1]), "--metrics-port", str(self.ports[2]), "--max-batch", str(max_batch),
                    "--queue-delay-us", "2000", "--threads", "1", "--allow-shm"]
        self.proc = None

    @property
    def grpc(self):
        return f"grpc://127.0.0.1:{self.ports[1]}/{self.name}"

    def start(self, timeout=90):
        import tritonclient.grpc as g

        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        client = g.InferenceServerClient(f"127.0.0.1:{self.ports[1]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if client.is_model_ready(self.name):
                    return self
            except Exception:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"serve did not get ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def kill(self):
        """SIGKILL to serve and everything it started (tritonserver, PyTriton's proxies): the server is gone at once."""
        if self.proc is not None:
            _killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            _killpg(self.proc.pid, signal.SIGKILL)  # anything of the group still alive
            self.proc.wait(30)


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


needs_pytriton = pytest.mark.skipif(importlib.util.find_spec("pytriton") is None, reason="PyTriton is not installed (the [serve] extra)")


@needs_pytriton
def test_serve_answers_like_the_local_model_and_a_dead_server_fails_frames_not_the_run(dynamic_onnx, tmp_path):
    from stfpm_edge.engines import open_engine
    from stfpm_edge.stream.pipeline import RunOptions, run_stream
    from stfpm_edge.stream.sources import open_source
    from tests.stream_fakes import _records, _write_video

    server = Server(dynamic_onnx, tmp_path).start()
    try:
        rng = np.random.default_rng(0)
        with open_engine(dynamic_onnx) as local, open_engine(server.grpc) as remote:
            assert remote.geometry == local.geometry and remote.threshold == local.threshold
            assert remote.meta["source_checkpoint"]["sha256"] == local.meta["source_checkpoint"]["sha256"]
            frames = rng.integers(0, 256, (5, local.geometry.height, local.geometry.width, 3), dtype=np.uint8)
            (lm, ls), (rm, rs) = local.infer(frames), remote.infer(frames)
            assert np.abs(ls - rs).max() <= 1e-5 and np.abs(lm - rm).max() <= 1e-5
        with open_engine(f"http://127.0.0.1:{server.ports[0]}/{server.name}") as over_http:
            assert np.abs(over_http.infer(frames)[1] - ls).max() <= 1e-5
        with open_engine(server.grpc + "?shm=1") as via_shm:  # frames and maps through system shared memory
            for n in (2, 5):  # the regions grow when a larger batch comes
                sm, ss = via_shm.infer(frames[:n])
                assert np.abs(ss - ls[:n]).max() <= 1e-5 and np.abs(sm - lm[:n]).max() <= 1e-5
        result = CliRunner().invoke(app, ["bench", server.grpc, str(dynamic_onnx), "--iters", "5", "--batch", "1"])
        assert result.exit_code == 0 and "triton-grpc-fp32" in result.output and "onnxruntime-fp32" in result.output, result.output
        video = tmp_path / "v.mp4"
        _write_video(video, 60, bad={7}, size=(64, 64))
        stop_at = threading.Timer(1.0, server.kill)
        stop_at.start()
        summary = run_stream(lambda: open_engine(server.grpc, timeout_s=2), open_source(str(video)), RunOptions(tmp_path / "o", pace_fps=20))
        stop_at.join()
        assert summary["frames_read"] == 60 == summary["frames_inspected"] + summary["frames_failed"]
        assert summary["frames_inspected"] > 0 and summary["frames_failed"] > 0  # the gap's frames are failed, the run goes on
        assert len(_records(tmp_path / "o")) == 60
        assert any("server unavailable" in r.get("error", "") or "127.0.0.1" in r.get("error", "") for r in _records(tmp_path / "o"))
        with pytest.raises(StfpmError, match="did not give the model's config"):  # opening a dead server: one clear line
            open_engine(server.grpc, timeout_s=1)
    finally:
        server.stop()
