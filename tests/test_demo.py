"""stfpm-edge demo end to end (reduced sizes)."""

import json

import pytest


@pytest.mark.slow
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


def test_demo_checks_its_options_before_generating_anything(tmp_path):
    from typer.testing import CliRunner

    from stfpm_edge.cli import app

    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--size", "100"])
    assert res.exit_code == 2 and "multiples of 16" in res.output
    assert not (tmp_path / "d").exists()
