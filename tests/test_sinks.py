"""Sinks (issue 13): verdicts to a real Mosquitto broker, a Modbus TCP server standing in for the PLC,
and webhook targets that answer, fail or hang — all on loopback, bounded in time."""

import collections
import json
import threading
import time

import numpy as np
import pytest

from stfpm_edge.errors import StfpmError
from stfpm_edge.stream.linescan import LineScanOptions, run_linescan
from stfpm_edge.stream.pipeline import RunOptions, run_stream
from stfpm_edge.stream.sinks import make_sink
from stfpm_edge.stream.sources import IterSource, open_source
from tests.stream_fakes import DarkSpotEngine, _records, _write_video

paho = pytest.importorskip("paho.mqtt.client", reason="the [line] extra is not installed (pip install -e '.[line]')")
pytest.importorskip("pymodbus", reason="the [line] extra is not installed (pip install -e '.[line]')")

from tests.line_peers import Broker, Plc, Subscriber, Webhook, mosquitto_path  # noqa: E402

needs_mosquitto = pytest.mark.skipif(mosquitto_path() is None, reason="Mosquitto is not installed (apt-get install mosquitto; .ci/run does)")


def _video(tmp_path, n, bad):
    path = tmp_path / "v.mp4"
    _write_video(path, n, bad=bad)
    return path


def _accounted(stats):
    return stats["offered"] == stats["sent"] + stats["failed"] + stats["dropped"] + stats["queued"]


@pytest.mark.parametrize("url, message", [
    ("ftp://x/y", "unknown kind"),
    ("mqtt://h/t?qos=5", "qos must be 0, 1 or 2"),
    ("mqtt://h/t?colour=red", "unknown option 'colour'"),
    ("mqtt://h/a/#", "wildcards"),
    ("mqtt://h/t?send=some", "send='some'"),
    ("mqtt://h/t?queue=0", "at least 1"),
    ("modbus://plc:502/register/4", "modbus://host:502/coil/N"),
    ("modbus://plc:502/coil/4?pulse_ms=abc", "not a float"),
    ("modbus://plc:502/coil/4?pulse_ms=0", "pulse_ms"),
    ("http://h/hook?timeout=-1", "timeout must be > 0"),
])
def test_sink_urls_are_checked_before_anything_connects(url, message):
    with pytest.raises(StfpmError, match=message):
        make_sink(url)


def test_credentials_in_sink_urls_are_masked():
    for url in ("mqtt://line:s3cr/t@broker:1883/a", "https://hook:s3cr/t@example.com/x?token=abc"):
        sink = make_sink(url)
        assert "s3cr" not in sink.name and "s3cr" not in json.dumps(sink.stats()) and "abc" not in sink.name


@needs_mosquitto
def test_mqtt_one_message_per_anomalous_frame_and_a_retained_status(tmp_path):
    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker.port, "line/#")
    try:
        bad = set(range(3, 120, 9))
        sink = make_sink(f"mqtt://127.0.0.1:{broker.port}/line/1?send=anomalous")
        summary = run_stream(lambda: DarkSpotEngine(), open_source(str(_video(tmp_path, 120, bad))), RunOptions(tmp_path / "o", sinks=[sink]))
        deadline = time.monotonic() + 5

        def statuses() -> list[str]:
            return [json.loads(p)["state"] for t, p, _, _ in sub.messages if t == "line/1/status"]

        # the broker delivers to the subscriber asynchronously: wait for the last frame and for the final status
        while (len(sub.payloads("line/1")) < len(bad) or statuses()[-1:] != ["stopped"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        frames = [m["frame"] for m in sub.payloads("line/1")]
        assert sorted(frames) == sorted(bad)  # exactly one per anomalous frame, none for good ones
        assert all(m["verdict"] == "anomalous" and m["source"].startswith("video") and m["threshold"] == 0.5 for m in sub.payloads("line/1"))
        st = summary["sinks"][0]
        assert st["sent"] == len(bad) and st["failed"] == st["dropped"] == 0 and st["latency_ms"]["n"] == len(bad)
        states = statuses()
        assert states[0] == "running" and states[-1] == "stopped"
        late = Subscriber(broker.port, "line/1/status", name="late")  # the status is retained: a late subscriber sees it at once
        time.sleep(0.3)
        retained = [(json.loads(p)["state"], r) for t, p, r, _ in late.messages]
        late.close()
        assert retained == [("stopped", True)]
    finally:
        sub.close()
        broker.stop()


@needs_mosquitto
def test_mqtt_broker_outage_queues_and_delivers_without_slowing_inspection(tmp_path):
    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker.port, "line/#")
    bad = set(range(2, 300, 6))
    sink = make_sink(f"mqtt://127.0.0.1:{broker.port}/line/1?send=anomalous&queue=1000")

    def outage():
        time.sleep(1.5)
        broker.stop()
        time.sleep(3.0)
        broker.start()

    t = threading.Thread(target=outage)
    try:
        t.start()
        summary = run_stream(lambda: DarkSpotEngine(), open_source(str(_video(tmp_path, 300, bad))),
                             RunOptions(tmp_path / "o", sinks=[sink], pace_fps=50))  # 6 s: the outage lies inside
        t.join()
        st = summary["sinks"][0]
        deadline = time.monotonic() + 10
        while len({m["frame"] for m in sub.payloads("line/1")}) < st["sent"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert summary["frames_read"] == 300 == summary["frames_inspected"] and summary["frames_dropped"] == 0
        received = collections.Counter(m["frame"] for m in sub.payloads("line/1"))
        assert set(received) <= bad and _accounted(st)
        assert len(received) == st["sent"] and st["sent"] + st["dropped"] + st["failed"] == len(bad)  # none silently lost
        assert st["sent"] == len(bad)  # the queue (1000) holds the gap's 25 messages: all delivered after the restart
        assert max(st["latency_ms"]["max"], 0) > 1000  # some waited out the outage
    finally:
        sub.close()
        broker.stop()


def test_modbus_one_coil_pulse_per_anomalous_frame(tmp_path):
    plc = Plc().start()
    try:
        bad = {4, 17, 30, 41}
        sink = make_sink(f"modbus://127.0.0.1:{plc.port}/coil/7?pulse_ms=30")
        summary = run_stream(lambda: DarkSpotEngine(), open_source(str(_video(tmp_path, 50, bad))), RunOptions(tmp_path / "o", sinks=[sink]))
        pulses = plc.pulses(7)
        assert len(pulses) == len(bad)
        assert all(0.025 <= off - on < 0.5 for on, off in pulses)  # the configured length, give or take the scheduler
        assert all(b[0] - a[1] >= 0.025 for a, b in zip(pulses, pulses[1:]))  # separate edges for the PLC to count
        st = summary["sinks"][0]
        assert st["sent"] == len(bad) and st["failed"] == 0 and st["latency_ms"]["n"] == len(bad) and st["coil"] == 7
    finally:
        plc.stop()


def test_modbus_plc_away_counts_failures_and_inspection_goes_on(tmp_path):
    port = Plc().port  # nothing listens there
    sink = make_sink(f"modbus://127.0.0.1:{port}/coil/1?pulse_ms=10&timeout=0.2")
    bad = {1, 5, 9}
    summary = run_stream(lambda: DarkSpotEngine(), open_source(str(_video(tmp_path, 12, bad))), RunOptions(tmp_path / "o", sinks=[sink]))
    st = summary["sinks"][0]
    assert summary["frames_inspected"] == 12 and len(_records(tmp_path / "o")) == 12
    assert st["sent"] == 0 and st["failed"] + st["dropped"] == len(bad) and "PLC" in st["last_error"]


def test_line_scan_detections_pulse_the_reject_coil(tmp_path):
    plc = Plc().start()
    try:
        web = np.full((640, 32, 3), 180, np.uint8)
        web[100:104, 10:14] = 0
        web[420:424, 20:24] = 0
        blocks = [web[i : i + 16] for i in range(0, 640, 16)]
        sink = make_sink(f"modbus://127.0.0.1:{plc.port}/coil/2?pulse_ms=10")
        summary = run_linescan(lambda: DarkSpotEngine(), IterSource(blocks), LineScanOptions(tmp_path / "o", overlap=0.0, sinks=[sink]))
        assert len(summary["defects"]) == 2
        st = summary["sinks"][0]
        assert st["sent"] == len(plc.pulses(2)) >= 2 and st["failed"] == 0  # one pulse per tile that found a defect
    finally:
        plc.stop()


def test_webhook_posts_anomalies_with_basic_auth(tmp_path):
    hook = Webhook("ok").start()
    try:
        sink = make_sink(f"http://line:pw@127.0.0.1:{hook.port}/reject?x=1")
        bad = {2, 7}
        summary = run_stream(lambda: DarkSpotEngine(), open_source(str(_video(tmp_path, 10, bad))), RunOptions(tmp_path / "o", sinks=[sink]))
        assert sorted(m["frame"] for m in hook.received) == sorted(bad)
        assert all(h["Authorization"].startswith("Basic ") for h in hook.headers)
        assert summary["sinks"][0]["sent"] == 2
    finally:
        hook.stop()


@pytest.mark.parametrize("mode", ["error", "hang"])
def test_webhook_that_fails_or_hangs_is_counted_and_never_holds_up_inspection(tmp_path, mode):
    hook = Webhook(mode, hang_s=3.0).start()
    try:
        bad = set(range(0, 200, 4))
        sink = make_sink(f"http://127.0.0.1:{hook.port}/reject?timeout=0.3&retries=1&queue=5&drain_s=1")
        t0 = time.perf_counter()
        summary = run_stream(lambda: DarkSpotEngine(), open_source(str(_video(tmp_path, 200, bad))), RunOptions(tmp_path / "o", sinks=[sink]))
        took = time.perf_counter() - t0
        st = summary["sinks"][0]
        assert summary["frames_inspected"] == 200 and len(_records(tmp_path / "o")) == 200  # every verdict logged
        assert st["sent"] == 0 and st["failed"] >= 1 and st["dropped"] >= 1 and _accounted(st) and st["offered"] == len(bad)
        assert ("HTTP 500" if mode == "error" else "timed out") in st["last_error"]
        # 50 messages x (2 tries x 0.3 s) would take 30 s if the sink held the loop up; the bounded queue
        # and the 1 s drain end the run long before that (a bound, not a timing claim)
        assert took < 15
    finally:
        hook.stop()


def _run_cli_into_webhook(exported, tmp_path, mode: str, query: str):
    """`stfpm-edge run` on a 6-frame video with a webhook sink answering as ``mode``: (CLI result, the hook, model, video)."""
    from typer.testing import CliRunner

    from stfpm_edge.cli import app

    _, onnx_path = exported
    video = tmp_path / "v.mp4"
    _write_video(video, 6, size=(64, 64))
    hook = Webhook(mode).start()
    try:
        result = CliRunner().invoke(app, ["run", str(onnx_path), "--source", str(video), "--out", str(tmp_path / "o"),
                                          "--sink", f"http://127.0.0.1:{hook.port}/v?{query}"])
    finally:
        hook.stop()
    return result, hook, onnx_path, video


def test_cli_messages_name_the_model_and_the_source(exported, tmp_path):
    result, hook, onnx_path, video = _run_cli_into_webhook(exported, tmp_path, "ok", "send=all")
    assert result.exit_code == 0, result.output
    assert len(hook.received) == 6 and "sent 6" in result.output
    assert all(m["model"] == str(onnx_path) and m["source"] == f"video {video}" and "threshold" in m for m in hook.received)


def test_a_reject_signal_that_never_reached_the_line_fails_the_run_and_says_so_while_it_happens(exported, tmp_path):
    """A webhook that answers 500 to every message: each verdict is still in frames.jsonl, but the run's exit status is
    non-zero, stderr warned while it happened, and the closing error names the sink and how many messages were lost."""
    result, *_ = _run_cli_into_webhook(exported, tmp_path, "error", "send=all&retries=0&timeout=0.5&drain_s=2")
    assert result.exit_code == 2, result.output
    assert "warning: sink" in result.output and "a message could not be delivered (webhook: HTTP 500" in result.output  # while it happened
    assert "6 of 6 messages never reached the line (failed 6, dropped 0)" in result.output
    assert len(_records(tmp_path / "o")) == 6  # every verdict is on disk all the same
