"""Changeover: a run given several models (recipes) switches between two frames when the station asks."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from stfpm_edge.errors import StfpmError
from stfpm_edge.stream.pipeline import RunOptions, run_stream
from stfpm_edge.stream.session import parse_recipes
from stfpm_edge.stream.sources import IterSource
from tests.stream_fakes import DarkSpotEngine, _frames, _records


class OtherProduct(DarkSpotEngine):
    """A second product's model: another input size, and scores 10 above the first's, so a record shows which judged it."""

    def infer(self, frames):
        maps, scores = super().infer(frames)
        return maps, scores + 10.0


def _post(url, body, headers=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_two_models_switched_through_the_station_mid_run(tmp_path, monkeypatch):
    """The issue's check: every frame accounted for, each record names its recipe, the first frame after the switch is
    judged by the new model, the switch and a refused unknown name are event records saying who asked."""
    out = tmp_path / "o"
    factories = {"bottle": lambda: DarkSpotEngine(size=(32, 32)), "screw": lambda: OtherProduct(size=(48, 80))}
    opts = RunOptions(out, ui="127.0.0.1:0", pace_fps=150, save_anomalies=False)
    holder = {}

    def operator():
        deadline = time.monotonic() + 30
        while "url" not in holder and time.monotonic() < deadline:
            time.sleep(0.02)
        url = holder["url"]
        while time.monotonic() < deadline:
            with urllib.request.urlopen(url + "api/state", timeout=5) as r:
                state = json.loads(r.read())
            if state["inspected"] >= 60:
                break
            time.sleep(0.02)
        holder["state_before"] = state
        holder["unknown"] = _post(url + "api/recipe", {"name": "gear"})
        holder["switch"] = _post(url + "api/recipe", {"name": "screw"})

    import stfpm_edge.stream.station as station_mod

    real_start = station_mod.Station.start

    def start(self):
        started = real_start(self)
        holder["url"] = self.url
        return started

    monkeypatch.setattr(station_mod.Station, "start", start)  # to learn the station's address (port 0: any free one)
    t = threading.Thread(target=operator, daemon=True)
    t.start()
    summary = run_stream(factories, IterSource(_frames(300, bad=range(0, 300, 7))), opts)
    t.join(5)

    assert holder["state_before"]["recipe"] == "bottle" and holder["state_before"]["recipes"] == ["bottle", "screw"]
    assert holder["unknown"][0] == 404 and "no recipe named 'gear'" in holder["unknown"][1]["error"]
    assert holder["switch"][0] == 200 and holder["switch"][1]["requested"] == "screw"
    assert summary["accounted"] and summary["frames_read"] == 300 and summary["frames_inspected"] == 300
    records = _records(out)
    frames = [r for r in records if "frame" in r and r.get("status") == "inspected"]
    assert [r["frame"] for r in frames] == list(range(300))
    changed = [r for r in records if r.get("event") == "recipe_changed"]
    refused = [r for r in records if r.get("event") == "recipe_refused"]
    assert len(changed) == 1 and changed[0]["old"] == "bottle" and changed[0]["new"] == "screw" and changed[0]["by"].startswith("ui 127.0.0.1")
    assert len(refused) == 1 and refused[0]["name"] == "gear"
    first = changed[0]["first_frame"]
    assert 60 <= first < 300
    # the record right after the event is that frame's, judged by the new model; none before it was, none after it was not
    after_event = records[records.index(changed[0]) + 1]
    assert after_event["frame"] == first and after_event["recipe"] == "screw" and after_event["score"] >= 10
    assert all(r["recipe"] == "bottle" and r["score"] < 10 for r in frames[:first])
    assert all(r["recipe"] == "screw" and r["score"] >= 10 for r in frames[first:])
    assert summary["recipe"] == "screw" and summary["recipe_changes"][0]["first_frame"] == first
    # the 48x80 model's maps are laid back over the 48x64 frames: its anomalous frames still have pictures' regions
    assert any(r["verdict"] == "anomalous" and r.get("regions") for r in frames[first:])


def test_a_bad_model_among_the_recipes_fails_the_run_before_any_frame(tmp_path):
    def broken():
        raise StfpmError("model.onnx: not an ONNX file")

    with pytest.raises(StfpmError, match="recipe screw: model.onnx: not an ONNX file"):
        run_stream({"bottle": lambda: DarkSpotEngine(), "screw": broken}, IterSource(_frames(10)), RunOptions(tmp_path / "o"))
    assert not (tmp_path / "o" / "frames.jsonl").exists()


def test_recipe_names_come_from_the_arguments():
    assert parse_recipes(["models/bottle.onnx"]) == {None: "models/bottle.onnx"}
    assert parse_recipes(["models/bottle.onnx", "screw-v2=models/s.onnx"]) == {"bottle": "models/bottle.onnx", "screw-v2": "models/s.onnx"}
    assert parse_recipes(["grpc://triton:8001/stfpm_bottle", "a.pt"]) == {"stfpm_bottle": "grpc://triton:8001/stfpm_bottle", "a": "a.pt"}
    assert parse_recipes(["gear=x.onnx"]) == {"gear": "x.onnx"}
    with pytest.raises(StfpmError, match="two models are named 'bottle'"):
        parse_recipes(["a/bottle.onnx", "b/bottle.onnx"])
    with pytest.raises(StfpmError, match="recipe name"):
        parse_recipes(["bad name=x.onnx", "y.onnx"])


def test_the_station_refuses_a_switch_in_a_run_with_one_model(tmp_path):
    from stfpm_edge.stream.inspection import Inspector
    from stfpm_edge.stream.station import Station

    inspector = Inspector(lambda: DarkSpotEngine(), None, threading.Event())
    events = []
    station = Station("127.0.0.1:0", tmp_path, [], [], inspector, events)
    answer = station.switch("screw", "test")
    assert "one model" in answer["error"] and events == [answer]


def test_run_takes_several_real_models_from_the_command_line(exported, tmp_path):
    """`stfpm-edge run A.pt NAME=B.onnx`: both open, the first judges and names itself in every record; a missing one is
    refused before the run folder is claimed."""
    from typer.testing import CliRunner

    from stfpm_edge.cli import app
    from tests.stream_fakes import _write_video

    pt, onnx = exported
    video = tmp_path / "v.mp4"
    _write_video(video, 12, size=(64, 64))
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(pt), f"spare={onnx}", "--source", str(video), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    records = _records(tmp_path / "o")
    assert [r["recipe"] for r in records if r.get("status") == "inspected"] == ["model"] * 12
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["recipe"] == "model" and set(summary["recipes"]) == {"model", "spare"} and summary["recipe_changes"] == []
    result = runner.invoke(app, ["run", str(pt), str(tmp_path / "gone.onnx"), "--source", str(video), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "gone.onnx" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_the_plc_register_and_the_message_bus_switch_recipes(tmp_path):
    """The product index in a holding register of pymodbus's server (the PLC), then a message on a real Mosquitto broker:
    each switches between two frames; an index with no model and an unknown name are refused and logged."""
    pytest.importorskip("pymodbus", reason="the [line] extra is not installed")
    pytest.importorskip("paho.mqtt.client", reason="the [line] extra is not installed")
    from stfpm_edge.stream.control import make_control
    from tests.line_peers import Broker, Plc, mosquitto_path

    if mosquitto_path() is None:
        pytest.skip("Mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
    plc, broker = Plc().start(), Broker(tmp_path / "broker").start()
    try:
        import paho.mqtt.client as mqtt

        out = tmp_path / "o"
        controls = [make_control(f"modbus://127.0.0.1:{plc.port}/register/5?poll_ms=20"), make_control(f"mqtt://127.0.0.1:{broker.port}/line7/recipe")]
        opts = RunOptions(out, pace_fps=100, save_anomalies=False, controls=controls)
        factories = {"bottle": lambda: DarkSpotEngine(size=(32, 32)), "screw": lambda: OtherProduct(size=(48, 80))}
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()

        def line():
            time.sleep(1.0)
            plc.write_register(5, 2)  # the PLC: product 2 (screw)
            time.sleep(0.5)
            plc.write_register(5, 7)  # no such product
            time.sleep(0.5)
            publisher.publish("line7/recipe", json.dumps({"recipe": "gear"}), qos=1).wait_for_publish(5)
            publisher.publish("line7/recipe", "bottle", qos=1).wait_for_publish(5)

        t = threading.Thread(target=line, daemon=True)
        t.start()
        summary = run_stream(factories, IterSource(_frames(400)), opts)
        t.join(10)
        publisher.loop_stop()
        publisher.disconnect()
    finally:
        plc.stop()
        broker.stop()
    assert summary["accounted"] and summary["frames_inspected"] == 400
    records = _records(out)
    changes = [r for r in records if r.get("event") == "recipe_changed"]
    refused = [r for r in records if r.get("event") == "recipe_refused"]
    assert [(c["old"], c["new"]) for c in changes] == [("bottle", "screw"), ("screw", "bottle")], changes
    assert changes[0]["by"].startswith("modbus register 5") and changes[1]["by"] == "mqtt line7/recipe"
    assert [r["name"] for r in refused] == ["product index 7", "gear"]
    frames = [r for r in records if r.get("status") == "inspected"]
    a, b = changes[0]["first_frame"], changes[1]["first_frame"]
    assert 0 < a < b < 400
    assert [r["recipe"] for r in frames] == ["bottle"] * a + ["screw"] * (b - a) + ["bottle"] * (400 - b)
    assert summary["recipe_controls"][0]["requests"] == 2 and summary["recipe_controls"][1]["refused"] == 1
