"""Drift: the good frames of a run followed against what the model saw at training (stfpm_edge.drift)."""

import json

import numpy as np

from stfpm_edge.drift import DriftWatch, image_stats, reference_from_meta, reference_of, summary_of
from stfpm_edge.engines.base import open_engine
from stfpm_edge.stream.pipeline import RunOptions, run_stream
from stfpm_edge.stream.sources import IterSource
from stfpm_edge.synthetic import texture


def _stationary(rng, n, shift_from=None, per_frame=0.0):
    for i in range(n):
        drift = 0.0 if shift_from is None or i < shift_from else per_frame * (i - shift_from)
        yield {"score": 1.0 + 0.1 * rng.standard_normal(), "brightness": 120 + 3 * rng.standard_normal() - drift,
               "contrast": 30 + rng.standard_normal(), "sharpness": 10 + 0.3 * rng.standard_normal()}


def _reference(rng):
    rows = list(_stationary(rng, 400))
    return {q: summary_of(q, [r[q] for r in rows]) for q in rows[0]}


def test_a_line_that_does_not_change_raises_no_drift_in_ten_thousand_frames():
    rng = np.random.default_rng(0)
    watch = DriftWatch(_reference(rng))
    events = [e for i, v in enumerate(_stationary(rng, 10_000)) if (e := watch.update(v, i))]
    assert events == []
    assert set(watch.z) == {"score", "brightness", "contrast", "sharpness"} and max(abs(z) for z in watch.z.values()) < 2


def test_a_steady_fall_in_brightness_is_raised_then_cleared_when_the_light_comes_back():
    rng = np.random.default_rng(1)
    watch = DriftWatch(_reference(rng))
    events = [e for i, v in enumerate(_stationary(rng, 300, shift_from=100, per_frame=0.5)) if (e := watch.update(v, i))]
    assert [e["state"] for e in events] == ["raised"]
    raised = events[0]
    assert "brightness" in raised["quantities"] and raised["quantities"]["brightness"]["z"] <= -4
    # a mean fall of 0.5 grey levels per frame, spread 3: 4 spreads = 12 levels = 24 frames, plus half a window of lag
    assert 110 <= raised["frame"] <= 150
    back = [e for i, v in enumerate(_stationary(rng, 100), start=300) if (e := watch.update(v, i))]
    assert [e["state"] for e in back] == ["cleared"] and not watch.drifting


def test_lower_scores_are_no_drift_but_higher_ones_are():
    rng = np.random.default_rng(2)
    ref = _reference(rng)
    low, high = DriftWatch(ref), DriftWatch(ref)
    for i, v in enumerate(_stationary(rng, 200)):
        assert low.update({**v, "score": 0.2}, i) is None
        event = high.update({**v, "score": 3.0}, i)
        if event:
            assert list(event["quantities"]) == ["score"]
    assert not low.drifting and high.drifting


def test_a_model_without_a_reference_learns_one_from_the_first_good_frames():
    rng = np.random.default_rng(3)
    watch = DriftWatch(reference_from_meta({}))
    assert "first 100 good frames" in watch.source
    events = [e for i, v in enumerate(_stationary(rng, 400, shift_from=200, per_frame=0.5)) if (e := watch.update(v, i))]
    assert events and events[0]["state"] == "raised" and events[0]["frame"] > 200
    # an older checkpoint with stored good scores: the score's reference comes from them, the rest from the run
    older = DriftWatch(reference_from_meta({"normal_stats": {"heldout_scores": [1.0, 1.1, 0.9, 1.05]}}))
    assert older.learned == ["brightness", "contrast", "sharpness"]


def test_image_statistics_follow_the_picture():
    rng = np.random.default_rng(4)
    img = texture(rng, 96, 128)
    a, dim, soft = image_stats(img), image_stats((img * 0.5).astype(np.uint8)), image_stats(np.full_like(img, img.mean()))
    assert dim["brightness"] < 0.6 * a["brightness"] and dim["contrast"] < a["contrast"]
    assert soft["sharpness"] < 0.1 * a["sharpness"] and soft["contrast"] < 1
    ref = reference_of([img, img], [0.1, 0.2])
    assert set(ref) == {"brightness", "contrast", "sharpness", "score"} and ref["brightness"]["spread"] >= 1.0


def _run_frames(model, out, frames):
    summary = run_stream(lambda: open_engine(model), IterSource(frames), RunOptions(out, save_anomalies=False))
    return summary, [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]


def test_a_run_whose_light_fades_after_frame_100_raises_drift_before_its_first_false_call(exported, tmp_path):
    """The issue's check: good frames whose brightness falls steadily after frame 100; the unchanged run raises nothing."""
    _, onnx = exported
    rng = np.random.default_rng(5)
    good = [texture(rng, 96, 128) for _ in range(300)]
    fading = [img if i < 100 else (img * max(0.0, 1 - 0.004 * (i - 100))).astype(np.uint8) for i, img in enumerate(good)]

    summary, records = _run_frames(onnx, tmp_path / "steady", good)
    assert summary["frames_inspected"] == 300 and not [r for r in records if r.get("event") == "drift"]
    flagged_anyway = {r["frame"] for r in records if r.get("verdict") == "anomalous"}  # the two-epoch test model's own false calls
    assert summary["drift"]["drifting"] is False and summary["drift"]["reference_from"] == "the training images"

    summary, records = _run_frames(onnx, tmp_path / "fading", fading)
    assert summary["accounted"] and summary["frames_inspected"] == 300
    drift = [r for r in records if r.get("event") == "drift"]
    assert drift and drift[0]["state"] == "raised" and drift[0]["frame"] >= 100
    # the false calls the fading light causes: frames flagged that the same images unfaded were not
    first_false_call = min((r["frame"] for r in records if r.get("verdict") == "anomalous" and r["frame"] not in flagged_anyway), default=None)
    assert first_false_call is not None and drift[0]["frame"] < first_false_call, (drift[0], first_false_call)
    assert summary["drift"]["drifting"] is True


def test_the_station_shows_a_banner_and_prometheus_a_gauge_while_drift_lasts(tmp_path):
    import threading

    from stfpm_edge.stream.counters import Counters
    from stfpm_edge.stream.inspection import Inspector
    from stfpm_edge.stream.metrics import _CountersCollector
    from stfpm_edge.stream.station import Station

    rng = np.random.default_rng(6)
    counters = Counters()
    counters.drift = DriftWatch(_reference(rng))
    station = Station("127.0.0.1:0", tmp_path, [counters], ["cam1"], Inspector(lambda: None, None, threading.Event()), [])

    def gauges():
        families = {f.name: f for f in _CountersCollector([counters], ["cam1"]).collect()}
        return families["stfpm_drift"].samples[0].value, {s.labels["quantity"]: s.value for s in families["stfpm_drift_shift"].samples}

    events = [e for i, v in enumerate(_stationary(rng, 200, shift_from=50, per_frame=0.5)) if (e := counters.drift.update(v, i))]
    station.event(events[0])
    state = station.state()
    assert state["sources"][0]["drifting"] and len(state["drift"]) == 1 and "brightness" in state["drift"][0]
    drifting, shifts = gauges()
    assert drifting == 1.0 and shifts["brightness"] <= -4
    back = [e for i, v in enumerate(_stationary(rng, 60), start=200) if (e := counters.drift.update(v, i))]
    station.event(back[-1])
    assert station.state()["drift"] == [] and gauges()[0] == 0.0
