"""The camera loop: sources, drop policy, accounting, SIGINT/SIGTERM flushing, reconnects, line-scan."""

import json
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from stfpm_edge.geometry import Geometry
from stfpm_edge.errors import StfpmError
from stfpm_edge.stream.linescan import LineScanOptions, Tiler, merge_detections, run_linescan, tile_starts
from stfpm_edge.stream.pipeline import RunOptions, run_stream
from stfpm_edge.stream.sources import IterSource, Source, SourceError, open_source
from tests.conftest import run_without_modules


class DarkSpotEngine:
    """A stand-in engine with a known map: 1 where a pixel is dark, else 0 (threshold 0.5)."""

    name = "fake"

    def __init__(self, size=(32, 32), delay=0.0):
        self.geometry = Geometry(*size)
        self.threshold = 0.5
        self.meta = {}
        self.delay = delay
        self.calls = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def infer(self, frames):
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        maps = (frames.mean(axis=3) < 40).astype(np.float32)
        return maps, maps.reshape(len(maps), -1).max(axis=1)


def _frames(n, bad=(), size=(48, 64)):
    for i in range(n):
        img = np.full(size + (3,), 180, np.uint8)
        if i in bad:
            img[10:20, 10:20] = 0
        yield img


def _write_video(path, n, bad=(), size=(48, 64)):
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (size[1], size[0]))
    for img in _frames(n, bad, size):
        vw.write(img)
    vw.release()


def _records(out):
    return [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]


def test_generated_video_every_frame_accounted(tmp_path):
    video = tmp_path / "v.mp4"
    _write_video(video, 60, bad={5, 30})
    src = open_source(str(video))
    assert src.kind == "video" and not src.live
    summary = run_stream(lambda: DarkSpotEngine(), src, RunOptions(tmp_path / "o", save_video=tmp_path / "o" / "ann.mp4"))
    assert summary["frames_read"] == 60 == summary["frames_inspected"] + summary["frames_failed"]
    assert summary["frames_dropped"] == 0 and summary["accounted"]
    recs = _records(tmp_path / "o")
    assert [r["frame"] for r in recs] == list(range(60))  # order kept
    assert {r["frame"] for r in recs if r["verdict"] == "anomalous"} == {5, 30}
    cap = cv2.VideoCapture(str(tmp_path / "o" / "ann.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 60
    assert len(list((tmp_path / "o" / "anomalies").glob("*_overlay.jpg"))) == 2


def test_folder_and_glob_sources_count_undecodable_files(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(_frames(5, bad={2})):
        cv2.imwrite(str(folder / f"{i:02d}.png"), img)
    (folder / "99.png").write_bytes(b"not a png")
    summary = run_stream(lambda: DarkSpotEngine(), open_source(str(folder)), RunOptions(tmp_path / "o1"))
    assert (summary["frames_read"], summary["frames_inspected"], summary["frames_failed"]) == (6, 5, 1)
    failed = [r for r in _records(tmp_path / "o1") if r["status"] == "failed"]
    assert len(failed) == 1 and "99.png" in failed[0]["error"]
    summary = run_stream(lambda: DarkSpotEngine(), open_source(str(folder / "0*.png")), RunOptions(tmp_path / "o2"))
    assert summary["frames_read"] == 5 and summary["frames_anomalous"] == 1


def test_missing_camera_and_bad_spec_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="camera 97"):
        open_source("97")
    with pytest.raises(SourceError, match="not a camera index"):
        open_source(str(tmp_path / "nothing-here.mp4"))
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path / "*.png"))


def test_secrets_are_masked_in_errors():
    with pytest.raises(SourceError) as info:
        open_source("rtsp://admin:hunter2@127.0.0.1:1/stream")
    assert "hunter2" not in str(info.value) and "admin:***@" in str(info.value)


def test_live_source_keeps_only_the_newest_frame(tmp_path):
    # a fast live source and a slow engine: stale frames are dropped and counted, nothing is lost silently
    src = IterSource(_frames(80), live=True, fps=400)
    summary = run_stream(lambda: DarkSpotEngine(delay=0.02), src, RunOptions(tmp_path / "o"))
    assert summary["frames_dropped"] > 0
    assert summary["frames_read"] == 80 == summary["frames_inspected"] + summary["frames_dropped"] + summary["frames_failed"]
    assert summary["latency_ms"]["wait"]["p99"] < 200  # bounded: at most one frame waits


def test_stop_event_drains_and_flushes(tmp_path):
    stop = threading.Event()

    def endless():
        i = 0
        while True:
            yield next(_frames(1))
            i += 1
            if i == 25:
                stop.set()  # as a SIGINT handler would

    summary = run_stream(lambda: DarkSpotEngine(), IterSource(endless()), RunOptions(tmp_path / "o"), stop)
    recs = _records(tmp_path / "o")
    assert len(recs) == summary["frames_read"] == summary["frames_inspected"] >= 25
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["accounted"]


class FlakyCamera(Source):
    """A live source that loses its connection once after 10 frames."""

    live = True
    kind = "camera"

    def __init__(self):
        super().__init__("flaky")
        self.connected, self.dropped_once, self.n = True, False, 0

    def read(self):
        from stfpm_edge.stream.sources import Frame

        if not self.connected:
            return None
        if self.n == 10 and not self.dropped_once:
            self.dropped_once, self.connected = True, False
            return None
        if self.n >= 20:
            return None
        self.n += 1
        time.sleep(0.01)
        return Frame(self.n - 1, next(_frames(1)), time.time())

    def reopen(self):
        self.connected = True
        return True


def test_reconnect_after_a_drop_is_recorded(tmp_path):
    opts = RunOptions(tmp_path / "o", backoff_s=0.01, max_reconnects=2)
    summary = run_stream(lambda: DarkSpotEngine(), FlakyCamera(), opts)
    assert summary["reconnects"] >= 1 and summary["gaps"][0]["after_frame"] == 9
    assert summary["frames_read"] == 20
    events = [r for r in _records(tmp_path / "o") if r.get("event") == "reconnect"]
    assert events and events[0]["gap_s"] >= 0


def test_engine_that_does_not_open_fails_before_the_first_frame(tmp_path):
    def bad_factory():
        raise StfpmError("model metadata does not fit")

    src = IterSource(_frames(5))
    with pytest.raises(StfpmError, match="does not fit"):
        run_stream(bad_factory, src, RunOptions(tmp_path / "o"))


def test_sigint_to_the_cli_flushes_valid_jsonl(tiny_run, tmp_path):
    from stfpm_edge.export.onnx_export import export_onnx

    run_dir, _ = tiny_run
    model = tmp_path / "m.onnx"
    export_onnx(run_dir / "model.pt", model)
    video = tmp_path / "long.mp4"
    _write_video(video, 3000, size=(64, 64))
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "stfpm_edge.cli", "run", str(model), "--source", str(video), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not ((out / "frames.jsonl").exists() and (out / "frames.jsonl").stat().st_size > 2000):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    recs = _records(out)  # every line is complete JSON
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < len(recs) == summary["frames_inspected"] == summary["frames_read"] < 3000
    assert "frames read" in stdout


def test_tile_starts_cover_everything():
    assert tile_starts(100, 100, 50) == [0]
    assert tile_starts(250, 100, 50) == [0, 50, 100, 150]
    assert tile_starts(260, 100, 50) == [0, 50, 100, 150, 160]


def test_tiler_handles_arbitrary_chunks():
    tiler = Tiler(32, 32, 0.5)
    web = np.zeros((150, 80, 3), np.uint8)
    tiles = []
    for start in range(0, 150, 7):
        tiles += tiler.push(web[start : start + 7])
    tiles += tiler.finish()
    rows = {y for y, _, _ in tiles}
    assert sorted(rows) == [0, 16, 32, 48, 64, 80, 96, 112, 118]
    assert {x for _, x, _ in tiles} == {0, 16, 32, 48}
    assert all(t.shape == (32, 32, 3) for _, _, t in tiles)


def test_line_scan_finds_planted_defects_at_their_rows(tmp_path):
    rng = np.random.default_rng(0)
    web = np.full((1000, 100, 3), 180, np.uint8)
    planted = [(100, 20), (255, 70), (511, 50), (800, 10)]  # row 255 straddles a 32-row tile boundary (stride 16)
    for r, c in planted:
        web[r - 3 : r + 3, c - 3 : c + 3] = 0

    def chunks():
        i = 0
        while i < len(web):
            k = int(rng.integers(1, 9))
            yield web[i : i + k]
            i += k

    summary = run_linescan(lambda: DarkSpotEngine((32, 32)), IterSource(chunks()), LineScanOptions(tmp_path / "ls", mm_per_row=0.1, strip_downsample=2))
    assert summary["rows_received"] == 1000 and summary["rows_uninspected"] == 0
    found = [(d["row"], d["col"]) for d in summary["defects"]]
    assert len(found) == len(planted)
    for (r, c), (fr, fc) in zip(planted, found):
        assert abs(fr - r) <= 4 and abs(fc - c) <= 4
    assert summary["defects"][0]["position_mm"] == pytest.approx(summary["defects"][0]["row"] * 0.1)
    assert (tmp_path / "ls" / "heat_strip.png").stat().st_size > 0


def test_merge_detections_keeps_one_per_defect():
    dets = [{"row": 100, "col": 10, "score": 1.0}, {"row": 105, "col": 12, "score": 2.0}, {"row": 300, "col": 10, "score": 1.5}]
    merged = merge_detections(dets, 16, 16)
    assert [(d["row"], d["score"]) for d in merged] == [(105, 2.0), (300, 1.5)]


def test_demo_end_to_end_reduced(tmp_path):
    from typer.testing import CliRunner

    from stfpm_edge.cli import app

    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--epochs", "2", "--size", "64", "--frames", "30", "--web-rows", "400"])
    assert res.exit_code == 0, res.output
    assert "GENERATED" in res.output and "report:" in res.output
    for f in ("report.md", "model.onnx", "train/model.pt", "stream/frames.jsonl", "stream/annotated.mp4", "linescan/heat_strip.png", "linescan/tiles.jsonl"):
        assert (out / f).is_file(), f
    stream = json.loads((out / "stream" / "summary.json").read_text())
    assert stream["frames_read"] == 30 == stream["frames_inspected"] + stream["frames_failed"]
    ls = json.loads((out / "linescan" / "summary.json").read_text())
    assert ls["rows_received"] == 400 and ls["rows_uninspected"] == 0


def test_output_failure_does_not_hang_and_leaves_valid_jsonl(tmp_path, monkeypatch):
    import stfpm_edge.stream.pipeline as pl

    calls = {"n": 0}
    real = pl.JsonlWriter.write

    def failing_write(self, record):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(self, record)

    monkeypatch.setattr(pl.JsonlWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        run_stream(lambda: DarkSpotEngine(), IterSource(_frames(200)), RunOptions(tmp_path / "o"))
    lines = (tmp_path / "o" / "frames.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(l)["status"] == "inspected" for l in lines)


def test_run_command_with_onnx_never_imports_torch(tiny_run, tmp_path):
    from stfpm_edge.export.onnx_export import export_onnx

    run_dir, _ = tiny_run
    model = tmp_path / "m.onnx"
    export_onnx(run_dir / "model.pt", model)
    video = tmp_path / "v.mp4"
    _write_video(video, 20, bad={3}, size=(64, 64))
    code = (
        "from typer.testing import CliRunner\n"
        "from stfpm_edge.cli import app\n"
        f"r = CliRunner().invoke(app, ['run', r'{model}', '--source', r'{video}', '--out', r'{tmp_path / 'o'}', '--save-video', r'{tmp_path / 'o' / 'a.mp4'}'])\n"
        "assert r.exit_code == 0, r.output\n"
    )
    run_without_modules(code, ("torch", "timm", "sklearn", "matplotlib"))
    assert len(_records(tmp_path / "o")) == 20
