"""Training end to end on generated data: outputs, checkpoint, resume, reproducibility, CLI errors."""

import json
import pickle

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stfpm_edge.checkpoint import load_checkpoint, read_checkpoint
from stfpm_edge.cli import app
from stfpm_edge.config import load_config
from stfpm_edge.errors import ModelFileError, StfpmError
from stfpm_edge.train import LAST, train


def test_run_folder_outputs(tiny_run):
    run_dir, metrics = tiny_run
    for name in ("model.pt", "metrics.json", "scores.csv", "roc.png", "config.json"):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "overlays").glob("*.png"))) == 3
    assert not (run_dir / LAST).exists()  # resume state removed once finished
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pixel_f1", "aupro", "image_f1", "threshold"):
        assert saved[key] is not None and 0.0 <= saved[key] or key == "threshold"
    assert len((run_dir / "scores.csv").read_text().strip().splitlines()) == 1 + 10


def test_checkpoint_is_self_contained(tiny_run):
    run_dir, metrics = tiny_run
    model, meta = load_checkpoint(run_dir / "model.pt")
    assert meta["geometry"] == {"height": 64, "width": 64, "resize": "squash", "pad_value": 0}
    assert meta["threshold"]["image"] == pytest.approx(metrics["threshold"])
    assert meta["metrics"]["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert meta["normalization"]["mean"] == [0.5, 0.5, 0.5]
    amap, score = model(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
    assert amap.shape == (2, 1, 64, 64) and score.shape == (2,)


def test_checkpoint_with_code_truncated_or_foreign_is_refused(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    data = (run_dir / "model.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated.pt"):
        read_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(ModelFileError, match="not a stfpm-edge checkpoint"):
        read_checkpoint(foreign)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ModelFileError, match="never loaded"):
        read_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()


class Exploit:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(__file__).parent / "pwned",))


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), epochs=2, batch_size=8, height=64, width=64, lr=0.05, overlays=0)
    base.update(kw)
    return load_config(None, base)


def test_resume_continues_and_matches_uninterrupted_run(synthetic_mvtec, tmp_path, monkeypatch):
    _, full = train(_cfg(synthetic_mvtec, tmp_path / "full", epochs=2), progress=False)
    # interrupt after the first epoch: make the second epoch crash
    import stfpm_edge.train as tr

    real = tr.run_epoch
    calls = {"n": 0}

    def crash_on_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(tr, "run_epoch", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synthetic_mvtec, tmp_path / "resumed", epochs=2), progress=False)
    assert (tmp_path / "resumed" / LAST).is_file() and not (tmp_path / "resumed" / "model.pt").exists()
    monkeypatch.setattr(tr, "run_epoch", real)
    with pytest.raises(StfpmError, match="--resume"):
        train(_cfg(synthetic_mvtec, tmp_path / "resumed", epochs=2), progress=False)
    _, resumed = train(_cfg(synthetic_mvtec, tmp_path / "resumed", epochs=2), resume=True, progress=False)
    assert resumed["threshold"] == pytest.approx(full["threshold"], rel=1e-4)
    assert resumed["image_auroc"] == pytest.approx(full["image_auroc"], abs=1e-6)
    with pytest.raises(StfpmError, match="nothing to resume"):
        train(_cfg(synthetic_mvtec, tmp_path / "resumed", epochs=2), resume=True, progress=False)


def test_teacher_cache_gives_the_same_training(synthetic_mvtec, tmp_path):
    _, cached = train(_cfg(synthetic_mvtec, tmp_path / "a", epochs=1, cache_teacher=True), progress=False)
    _, uncached = train(_cfg(synthetic_mvtec, tmp_path / "b", epochs=1, cache_teacher=False), progress=False)
    assert cached["threshold"] == pytest.approx(uncached["threshold"], rel=1e-4)


def test_grayscale_letterbox_run_without_defects(tmp_path):
    import cv2

    from stfpm_edge.synthetic import texture

    rng = np.random.default_rng(0)
    for i in range(6):
        gray = cv2.cvtColor(texture(rng, 40, 100), cv2.COLOR_BGR2GRAY)  # 2.5:1, single channel
        (tmp_path / "data" / "good").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "data" / "good" / f"{i}.png"), gray)
    run_dir, metrics = train(_cfg(tmp_path / "data", tmp_path / "run", epochs=1, resize="letterbox", width=128), progress=False)
    assert metrics["image_auroc"] is None and any("no test images" in n for n in metrics["notes"])
    assert (run_dir / "model.pt").is_file()


runner = CliRunner()


def test_cli_train_missing_folder_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "missing: data folder not found" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_cli_train_corrupt_image_writes_nothing(synthetic_mvtec, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_mvtec, data)
    (data / "train" / "good" / "005.png").write_bytes(b"\x89PNG broken")
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "o"), "--size", "64", "--epochs", "1"])
    assert result.exit_code == 2 and "005.png" in result.output
    assert not (tmp_path / "o").exists()


def test_cli_config_file_and_flag_override(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: somewhere\nepochs: 7\nlr: 0.1\n")
    cfg = load_config(cfg_file, {"epochs": 3})
    assert (cfg.data, cfg.epochs, cfg.lr, cfg.batch_size) == ("somewhere", 3, 0.1, 32)
    cfg_file.write_text("epohcs: 7\n")
    with pytest.raises(StfpmError, match="unknown option"):
        load_config(cfg_file, {"data": "x"})


def test_cli_eval_and_table(tiny_run, synthetic_mvtec, tmp_path):
    run_dir, metrics = tiny_run
    result = runner.invoke(app, ["eval", str(run_dir / "model.pt"), "--data", str(synthetic_mvtec), "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)
    assert ev["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"], abs=1e-6)
    result = runner.invoke(app, ["table", str(run_dir)])
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("| Metric | Avg | carpet |") and "weave" in lines[0]
    assert lines[2].startswith("| Image AUC | ") and f"{100 * metrics['image_auroc']:.1f}" in lines[2]


def test_device_choice_is_checked(synthetic_mvtec, tmp_path):
    import torch

    from stfpm_edge.train import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(StfpmError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(StfpmError, match="no CUDA GPU"):
            train(_cfg(synthetic_mvtec, tmp_path / "r", device="cuda"), progress=False)
        assert not (tmp_path / "r").exists()


def test_augmented_training_runs(synthetic_mvtec, tmp_path):
    _, m = train(_cfg(synthetic_mvtec, tmp_path / "aug", epochs=1, augment=True), progress=False)
    assert m["image_auroc"] is not None
