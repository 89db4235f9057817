"""The PLC handshake against pymodbus's server standing in for the PLC: trigger -> result -> acknowledgement."""

import threading

import pytest

from stfpm_edge.errors import StfpmError
from stfpm_edge.stream.pipeline import RunOptions, run_stream
from stfpm_edge.stream.sources import IterSource
from tests.stream_fakes import DarkSpotEngine, _frames, _records

pytest.importorskip("pymodbus", reason="the [line] extra is not installed (pip install -e '.[line]')")

from tests.line_peers import ACK, OK, READY, SEQ, TRIGGER, VALID, Plc, PlcProgram  # noqa: E402


def _url(port, **extra):
    q = "&".join(f"{k}={v}" for k, v in {"trigger": TRIGGER, "ready": READY, "valid": VALID, "ok": OK, "ack": ACK, "seq": SEQ, **extra}.items())
    return f"modbus://127.0.0.1:{port}/handshake?{q}"


def test_trigger_result_acknowledgement_and_a_missing_ack(tmp_path):
    """The issue's check: ten triggers, each answered with OK/NG, a sequence number and result-valid, acknowledged by the
    PLC; the eleventh goes unacknowledged and is reported. Frames 3 and 7 are defective."""
    from stfpm_edge.stream.handshake import PlcHandshake

    plc = Plc().start()
    try:
        hs = PlcHandshake(_url(plc.port, ack_ms=300))
        results, failed, stop = [], [], threading.Event()

        def program():
            try:
                p = PlcProgram(plc.port)
                for i in range(11):
                    results.append(p.cycle(acknowledge=i < 10))
            except Exception as exc:  # the PLC program gave up: end the run rather than wait for triggers for ever
                failed.append(exc)
                stop.set()

        t = threading.Thread(target=program, daemon=True)
        t.start()
        summary = run_stream(lambda: DarkSpotEngine(), IterSource(_frames(50, bad=(3, 7))), RunOptions(tmp_path / "o", max_frames=11, trigger=hs), stop)
        t.join(10)
        assert not failed, failed
        ready_after = PlcProgram(plc.port).coil(READY)
    finally:
        plc.stop()
    assert len(results) == 11
    assert [r["seq"] for r in results] == list(range(1, 12))
    assert [r["ok"] for r in results] == [i not in (3, 7) for i in range(11)]
    records = [r for r in _records(tmp_path / "o") if r.get("status") == "inspected"]
    assert [r["frame"] for r in records] == list(range(11))  # one frame per trigger, none between
    missing = [r for r in _records(tmp_path / "o") if r.get("event") == "plc_ack_missing"]
    assert len(missing) == 1 and missing[0]["seq"] == 11 and missing[0]["waited_ms"] >= 300
    hs_summary = summary["handshake"]
    assert hs_summary["cycles"] == 11 and hs_summary["acks_missing"] == 1 and hs_summary["no_verdict"] == 0
    assert results[-1]["valid_to_released_ms"] >= 0.8 * 300  # result-valid held until the ack timeout (as the polling PLC saw it)
    assert not ready_after  # the run ended: ready is off, a PLC does not trigger a station that is gone


def test_a_plc_that_does_not_answer_fails_the_run_before_any_frame(tmp_path):
    from stfpm_edge.stream.handshake import PlcHandshake
    from tests.line_peers import free_port

    hs = PlcHandshake(_url(free_port(), timeout=0.3))
    with pytest.raises(StfpmError, match="no PLC answers"):
        run_stream(lambda: DarkSpotEngine(), IterSource(_frames(5)), RunOptions(tmp_path / "o", trigger=hs))
    assert not (tmp_path / "o" / "frames.jsonl").exists()


@pytest.mark.parametrize("url, message", [
    ("modbus://plc:502/handshake?trigger=1&ready=2&valid=3&ok=4", "name the PLC's ack, seq"),
    ("modbus://plc:502/handshake?trigger=1&ready=1&valid=3&ok=4&ack=5&seq=0", "five different addresses"),
    ("modbus://plc:502/coil/3", "modbus://host:502/handshake"),
])
def test_handshake_urls_are_checked(url, message):
    from stfpm_edge.stream.handshake import PlcHandshake

    with pytest.raises(StfpmError, match=message):
        PlcHandshake(url)
