"""Integration on the real MVTec AD bottle data, with reduced settings (skips when the data is absent)."""

import json

import pytest

from tests.conftest import bottle_or_skip


@pytest.mark.slow
def test_train_and_eval_on_real_bottle(tmp_path):
    from typer.testing import CliRunner

    from stfpm_edge.cli import app

    bottle = bottle_or_skip()
    out = tmp_path / "bottle"
    result = CliRunner().invoke(app, ["train", "--data", str(bottle), "--out", str(out), "--epochs", "6", "--size", "128", "--batch-size", "16", "--overlays", "2"])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 83 and m["n_anomalous"] == 63
    # reduced settings (6 epochs at 128 px) still separate the bottle defects well
    assert m["image_auroc"] >= 0.95
    assert m["pixel_auroc"] >= 0.93
    assert 0.0 < m["aupro"] <= 1.0 and 0.0 < m["pixel_f1"] <= 1.0
