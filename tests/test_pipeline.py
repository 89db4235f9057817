"""The camera loop: sources, drop policy, accounting, SIGINT/SIGTERM flushing, reconnects, line-scan."""

import json
import threading

import cv2
import pytest

from stfpm_edge.errors import StfpmError
from stfpm_edge.stream.pipeline import RunOptions, run_stream
from stfpm_edge.stream.sources import IterSource, open_source
from tests.stream_fakes import (
    DarkSpotEngine,
    FlakyCamera,
    _frames,
    _records,
    _write_video,
)


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


def test_output_failure_does_not_hang_and_leaves_valid_jsonl(tmp_path, monkeypatch):
    import stfpm_edge.stream.outputs as pl

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
