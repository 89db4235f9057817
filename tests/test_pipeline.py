"""The camera loop: sources, drop policy, accounting, SIGINT/SIGTERM flushing, reconnects, line-scan."""

import json
import threading
import time

import cv2
import pytest

from stfpm_edge.errors import StfpmError
from stfpm_edge.stream.capture import Reconnect
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
    opts = RunOptions(tmp_path / "o", reconnect=Reconnect(max_attempts=2, backoff_s=0.01))
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


def test_full_disk_for_side_outputs_keeps_every_verdict(tmp_path, monkeypatch):
    """Anomaly pictures that cannot be written are reported once and counted; inspection and the JSONL go on."""
    import errno

    import stfpm_edge.stream.outputs as outputs

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "atomic_write_bytes", no_space)
    frames = _frames(30, bad={3, 9, 20})
    summary = run_stream(lambda: DarkSpotEngine(), IterSource(frames), RunOptions(tmp_path / "o"))
    assert summary["frames_inspected"] == 30 and summary["frames_anomalous"] == 3
    assert summary["output_failures"] == [{"output": "AnomalyFiles", "failed": 3, "error": "[Errno 28] No space left on device"}]
    recs = _records(tmp_path / "o")
    assert sum(r.get("status") == "inspected" for r in recs) == 30
    assert [r["event"] for r in recs if "event" in r] == ["output_failed"]  # said once


def test_jsonl_never_ends_in_a_partial_line(tmp_path, monkeypatch):
    import errno
    import os

    import stfpm_edge.stream.outputs as outputs

    real = os.pwrite
    state = {"n": 0}

    def flaky_pwrite(fd, data, offset):
        state["n"] += 1
        if 10 <= state["n"] < 15:  # the disk is full for a while: half a line gets out, then an error
            real(fd, data[: len(data) // 2], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(outputs.os, "pwrite", flaky_pwrite)
    summary = run_stream(lambda: DarkSpotEngine(), IterSource(_frames(40)), RunOptions(tmp_path / "o", save_anomalies=False))
    text = (tmp_path / "o" / "frames.jsonl").read_text()
    assert text.endswith("\n")
    recs = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert len(recs) == 35 and summary["records_lost"] == 5 and "No space" in summary["records_error"]


def test_anomaly_pictures_are_capped(tmp_path):
    frames = _frames(40, bad=set(range(0, 40, 2)))
    opts = RunOptions(tmp_path / "o", keep_anomalies=4)
    summary = run_stream(lambda: DarkSpotEngine(), IterSource(frames), opts)
    kept = sorted(p.name for p in (tmp_path / "o" / "anomalies").iterdir())
    assert summary["frames_anomalous"] == 20 and summary["anomaly_files_rotated"] == 16
    assert kept == sorted(f"{i:06d}_{k}" for i in (32, 34, 36, 38) for k in ("overlay.jpg", "heatmap.png"))


def test_several_sources_batched_into_one_engine_give_the_single_source_records(tmp_path):
    bads = [{3, 17}, {5}, {0, 9, 29}]
    videos = []
    for i, bad in enumerate(bads):
        videos.append(tmp_path / f"cam{i}.mp4")
        _write_video(videos[-1], 30 + 5 * i, bad=bad)
    singles = []
    for i, v in enumerate(videos):
        run_stream(lambda: DarkSpotEngine(), open_source(str(v)), RunOptions(tmp_path / f"single{i}"))
        singles.append(_records(tmp_path / f"single{i}"))
    engine = DarkSpotEngine()
    summary = run_stream(lambda: engine, [open_source(str(v)) for v in videos], RunOptions(tmp_path / "multi"))
    recs = _records(tmp_path / "multi")
    total = sum(30 + 5 * i for i in range(3))
    assert summary["frames_read"] == total == summary["frames_inspected"] and summary["accounted"]
    assert engine.calls < total  # frames of several sources shared engine calls
    for i, v in enumerate(videos):
        mine = [r for r in recs if r["source"] == f"video {v}"]
        strip = lambda rs: [(r["frame"], r["verdict"], r["score"]) for r in rs]  # noqa: E731
        assert strip(mine) == strip(singles[i])  # verdicts never cross sources, order kept
        per = summary["sources"][i]
        assert per["source"] == f"video {v}" and per["frames_read"] == per["frames_inspected"] == 30 + 5 * i
        assert per["frames_anomalous"] == len(bads[i])
    pictures = sorted(p.name for p in (tmp_path / "multi" / "anomalies").glob("*_overlay.jpg"))
    assert len(pictures) == sum(map(len, bads)) and pictures[0].startswith("s0-")


def test_a_source_that_dies_does_not_stop_the_others(tmp_path):
    video = tmp_path / "v.mp4"
    _write_video(video, 40, bad={4})
    cam = FlakyCamera()
    cam.reopen = lambda: False  # this camera never comes back
    summary = run_stream(lambda: DarkSpotEngine(), [cam, open_source(str(video))],
                         RunOptions(tmp_path / "o", reconnect=Reconnect(max_attempts=1, backoff_s=0.01)))
    flaky, good = summary["sources"]
    assert flaky["frames_read"] == 10 and good["frames_read"] == 40 == good["frames_inspected"]
    assert any(r.get("event") == "gave_up" for r in _records(tmp_path / "o"))


def test_several_sources_refuse_single_source_outputs(tmp_path):
    video = tmp_path / "v.mp4"
    _write_video(video, 3)
    with pytest.raises(StfpmError, match="take one source"):
        run_stream(lambda: DarkSpotEngine(), [open_source(str(video)), open_source(str(video))],
                   RunOptions(tmp_path / "o", save_video=tmp_path / "a.mp4"))


def test_a_batch_cap_of_one_serves_every_source_in_turn(tmp_path):
    from stfpm_edge.stream.capture import END, Mux

    mux = Mux([False, False, False], max_batch=1)
    ports = [mux.port(i) for i in range(3)]
    for i, p in enumerate(ports):
        p.put(f"a{i}")
        p.put(f"b{i}")
        p.put(END)
    got = []
    while (batch := mux.get_batch()) is not END:
        assert len(batch) == 1
        got.append(batch[0][1])
    assert got == ["a0", "a1", "a2", "b0", "b1", "b2"]
    mux = Mux([False, False], max_batch=None)
    for p in (mux.port(0), mux.port(1)):
        p.put("x")
        p.put(END)
    assert mux.get_batch() == [(0, "x"), (1, "x")] and mux.get_batch() is END


def test_live_prometheus_metrics_per_source(tmp_path):
    import urllib.request

    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus-client is not installed (the [serve] extra)")
    from tests.line_peers import free_port

    videos = []
    for i in range(2):
        videos.append(tmp_path / f"cam{i}.mp4")
        _write_video(videos[-1], 60, bad={4, 40})
    port = free_port()
    scrapes = []

    def scrape():
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    scrapes.append({(s.name, tuple(sorted(s.labels.items()))): s.value
                                    for fam in parser.text_string_to_metric_families(r.read().decode()) for s in fam.samples})
            except OSError:
                pass
            if len(scrapes) >= 2:
                return
            threading.Event().wait(0.5)

    t = threading.Thread(target=scrape)
    t.start()
    summary = run_stream(lambda: DarkSpotEngine(), [open_source(str(v)) for v in videos], RunOptions(tmp_path / "o", pace_fps=30, metrics_port=port))
    t.join()
    assert len(scrapes) >= 2 and summary["metrics"].endswith(f":{port}/metrics")
    last = scrapes[-1]
    name = f"video {videos[1]}"
    inspected = last[("stfpm_frames_total", (("source", name), ("state", "inspected")))]
    assert 0 < inspected <= 60 and scrapes[0][("stfpm_frames_total", (("source", name), ("state", "inspected")))] <= inspected
    # observed just before the frame is counted: a scrape may fall in between
    assert inspected <= last[("stfpm_stage_latency_seconds_count", (("source", name), ("stage", "inference")))] <= inspected + 1
    assert ("stfpm_fps", (("source", name),)) in last


def test_anomalous_frames_list_their_defect_regions_and_a_minimum_area_keeps_small_ones_good(tmp_path):
    """A 48x64 frame on a 32x32 model: a 10x10 dark square (frames 3, 9) and a 2x2 speck (frame 6). Each frame above the
    threshold lists its regions in source pixels (and mm² with a scale); a 20 mm² minimum at 0.5 mm per pixel (25 mm² for
    the square, about 1 for the speck) keeps the speck's frame good and still rejects the squares."""
    frames = list(_frames(12, bad={3, 9}))
    frames[6][30:32, 40:42] = 0
    from stfpm_edge.stream.inspection import AreaRule

    plain = run_stream(lambda: DarkSpotEngine(), IterSource(iter([f.copy() for f in frames]), "gen"), RunOptions(tmp_path / "a"))
    recs = _records(tmp_path / "a")
    assert plain["accounted"] and {r["frame"] for r in recs if r["verdict"] == "anomalous"} == {3, 6, 9}
    square = recs[3]["regions"]
    assert len(square) == 1 and square[0]["peak"] == 1.0
    x, y, w, h = square[0]["box"]  # the square at x, y = 10..19 in source pixels, up to the 32 -> 48x64 resampling
    assert abs(x - 10) <= 2 and abs(y - 10) <= 2 and 8 <= w <= 12 and 8 <= h <= 12 and 64 <= square[0]["area_px"] <= 144
    assert "regions" not in recs[0]  # a good frame has none
    ruled = run_stream(lambda: DarkSpotEngine(), IterSource(iter([f.copy() for f in frames]), "gen"),
                       RunOptions(tmp_path / "b", area=AreaRule(min_area=20.0, mm_per_pixel=0.5)))
    recs = _records(tmp_path / "b")
    assert ruled["accounted"] and {r["frame"] for r in recs if r["verdict"] == "anomalous"} == {3, 9}
    assert recs[6]["verdict"] == "good" and recs[6]["regions"][0]["area_mm2"] < 20.0 <= recs[3]["regions"][0]["area_mm2"]


@pytest.mark.parametrize("sources", [1, 2])
def test_a_full_disk_before_the_first_frame_ends_the_run_promptly(tmp_path, monkeypatch, sources):
    """The summary's space cannot be reserved (a full disk at start): the run raises at once instead of leaving the
    inference thread waiting for frames that no capture will send (it hung forever, SIGTERM included)."""
    import errno
    import time

    import stfpm_edge.stream.pipeline as pipeline

    def no_space(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.ReservedJson, "reserve", no_space)
    srcs = [IterSource(iter(list(_frames(5))), f"gen{i}") for i in range(sources)]
    outcome = {}

    def go():
        try:
            run_stream(lambda: DarkSpotEngine(), srcs if sources > 1 else srcs[0], RunOptions(tmp_path / "o"))
        except OSError as exc:
            outcome["error"] = exc

    t0 = time.monotonic()
    worker = threading.Thread(target=go, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "the run hung after the summary could not be reserved"
    assert outcome["error"].errno == errno.ENOSPC and time.monotonic() - t0 < 20
    assert not [t for t in threading.enumerate() if t.name == "inference"]  # no thread left waiting on a queue


def test_a_run_under_systemd_says_ready_feeds_the_watchdog_with_inspected_frames_and_says_stopping(tmp_path, monkeypatch):
    """sd_notify's real protocol on a Unix datagram socket the test binds as systemd would: READY=1 once the captures
    run, WATCHDOG=1 while frames are inspected (paced 40 frames at 20 FPS: about two seconds, at most one a second),
    STOPPING=1 at the end."""
    import socket

    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    video = tmp_path / "v.mp4"
    _write_video(video, 40)
    summary = run_stream(lambda: DarkSpotEngine(), open_source(str(video)), RunOptions(tmp_path / "o", pace_fps=20))
    messages = []
    server.settimeout(0.5)
    try:
        while True:
            messages.append(server.recv(256).decode())
    except TimeoutError:
        pass
    finally:
        server.close()
    assert summary["frames_inspected"] == 40
    assert messages[0] == "READY=1" and messages[-1] == "STOPPING=1"
    feeds = messages.count("WATCHDOG=1")
    assert 1 <= feeds <= 4 and set(messages) == {"READY=1", "WATCHDOG=1", "STOPPING=1"}


def test_the_systemd_unit_is_a_notify_service_with_a_watchdog_and_restarts():
    import configparser
    import shutil
    import subprocess
    from pathlib import Path

    unit = Path(__file__).resolve().parents[1] / "deploy" / "stfpm-edge.service"
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(unit)
    service = parser["Service"]
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) > 0 and service["Restart"] == "on-failure"
    assert "stfpm-edge run" in service["ExecStart"] and parser["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here: the unit's keys were checked, not systemd's own verification")
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # the ExecStart binary and the User exist only on a line PC; any other complaint is a real problem with the unit
    problems = [line for line in out.stderr.splitlines() if line.strip() and "stfpm-edge run" not in line
                and "/opt/stfpm-edge" not in line and "stfpm" not in line.split(":")[-1]]
    assert not problems, out.stderr


class FreezingCamera:
    """A live source that delivers 15 frames, then stops sending while its connection stays open (a read that never
    returns), until it is reopened; after the reopen it delivers 10 more frames and ends."""

    live = True
    kind = "camera"

    def __init__(self):
        import numpy as np

        self.np, self.released, self.reopens, self.abandoned, self.n = np, threading.Event(), 0, 0, 0
        self.frozen_since = None

    def describe(self):
        return "camera freezing"

    def read(self):
        from stfpm_edge.stream.sources import Frame

        if self.n == 15 and self.reopens == 0:
            self.frozen_since = time.perf_counter()
            self.released.wait(30)  # hangs: no frame, no error, no end
            return None
        if self.n >= 25:
            return None
        i, self.n = self.n, self.n + 1
        return Frame(i, self.np.full((48, 64, 3), 180, self.np.uint8), float(i), f"{i:06d}")

    def abandon(self):
        self.abandoned += 1

    def reopen(self):
        self.reopens += 1
        return True

    def close(self):
        self.released.set()


def test_a_camera_that_stops_sending_without_closing_is_noticed_and_reopened(tmp_path):
    cam = FreezingCamera()
    opts = RunOptions(tmp_path / "o", reconnect=Reconnect(max_attempts=2, backoff_s=0.05, stall_s=0.5))
    t0 = time.perf_counter()
    summary = run_stream(lambda: DarkSpotEngine(), cam, opts)
    records = _records(tmp_path / "o")
    stalled = [r for r in records if r.get("event") == "stalled"]
    assert len(stalled) == 1 and stalled[0]["after_frame"] == 14 and stalled[0]["waited_s"] == 0.5
    assert [r["event"] for r in records if r.get("event")][:2] == ["stalled", "reconnect"]
    assert cam.abandoned == 1 and cam.reopens >= 1  # (then 2 more: the camera ends after 25 frames, tried twice more as a drop)
    assert summary["stalls"] == 1 and summary["reconnects"] >= 1 and summary["frames_read"] == 25 and summary["accounted"]
    assert time.perf_counter() - t0 < 10  # noticed in half a second, not the 30 s the frozen read would hang
    cam.released.set()


def test_a_real_http_stream_that_stalls_with_its_connection_open_is_reopened(tmp_path):
    """An MJPEG stream over HTTP (OpenCV's FFmpeg backend reads it) sends 15 frames, then nothing while keeping the
    connection open; the run notices within the stall time, records it, reconnects, and reads on from a new connection."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import numpy as np

    hold, connections = threading.Event(), []

    class Camera(BaseHTTPRequestHandler):
        def do_GET(self):
            connections.append(time.perf_counter())
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            try:
                for i in range(15 if len(connections) == 1 else 1000):
                    jpg = cv2.imencode(".jpg", np.full((48, 64, 3), 100 + i % 100, np.uint8))[1].tobytes()
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n")
                    self.wfile.flush()
                    if hold.wait(0.02):
                        return
                hold.wait(30)  # the first connection: stalled, still open
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Camera)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        src = open_source(f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg")
        t0 = time.perf_counter()
        summary = run_stream(lambda: DarkSpotEngine(), src, RunOptions(tmp_path / "o", max_frames=25,
                                                                         reconnect=Reconnect(max_attempts=2, backoff_s=0.05, stall_s=1.0)))
        took = time.perf_counter() - t0
    finally:
        hold.set()
        server.shutdown()
        server.server_close()
    events = [r for r in _records(tmp_path / "o") if r.get("event")]
    assert [e["event"] for e in events][:2] == ["stalled", "reconnect"] and events[0]["after_frame"] == 14
    assert summary["stalls"] == 1 and summary["frames_read"] == 25 and summary["accounted"] and len(connections) >= 2
    assert took < 20  # the stalled connection would have held the run for 30 s


def test_a_long_run_allocates_nothing_per_frame_once_its_windows_are_full(tmp_path, monkeypatch):
    """What grows in a long run are the bounded windows (latency per stage, drift); once full, nothing the package allocates
    may grow with the number of frames. Windows shrunk to 200 frames, allocations compared between frames 1,500 and 4,000:
    a leak of 26 bytes per frame would show. (The 100,000-frame soak with a real model: docs/faults.md.)"""
    import tracemalloc

    import numpy as np

    import stfpm_edge.stream.counters as counters

    monkeypatch.setattr(counters, "LATENCY_WINDOW", 200)
    snapshots = {}
    img = np.full((48, 64, 3), 180, np.uint8)

    def frames():
        for i in range(4000):
            if i in (1500, 3999):
                snapshots[i] = tracemalloc.take_snapshot()
            frame = img.copy()
            if i % 7 == 0:
                frame[10:20, 10:20] = 0  # anomalous now and then: regions, pictures off
            yield frame

    tracemalloc.start()
    try:
        summary = run_stream(lambda: DarkSpotEngine(), IterSource(frames()), RunOptions(tmp_path / "o", save_anomalies=False))
    finally:
        tracemalloc.stop()
    assert summary["frames_inspected"] == 4000
    ours = [st for st in snapshots[3999].compare_to(snapshots[1500], "lineno") if "stfpm_edge" in st.traceback[0].filename]
    grown = sum(st.size_diff for st in ours)
    assert grown < 64 * 1024, [(str(st.traceback[0]), st.size_diff) for st in sorted(ours, key=lambda s: -s.size_diff)[:5]]
