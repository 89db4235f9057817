"""The command line as a user drives it: signals, one-line errors, the torch-free run path."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stfpm_edge.cli import app
from stfpm_edge.config import load_config
from stfpm_edge.errors import StfpmError
from tests.conftest import run_without_modules
from tests.stream_fakes import _records, _write_video

runner = CliRunner()



@pytest.mark.slow
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
    frames = [r for r in recs if "status" in r]  # (besides event records such as drift)
    assert 0 < len(frames) == summary["frames_inspected"] == summary["frames_read"] < 3000
    assert "frames read" in stdout


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
        f"r = CliRunner().invoke(app, ['run', r'{model}', '--source', r'{video}', '--out', r'{tmp_path / 'o'}', '--save-video', r'{tmp_path / 'o' / 'a.mp4'}',\n"
        "    '--ui', '127.0.0.1:0', '--sink', 'http://127.0.0.1:9/hook?send=all&timeout=0.2&retries=0&drain_s=0.5'])\n"
        # nothing listens on port 9: the 20 messages never reach the line, so the run's exit status says so (2)
        "assert r.exit_code == 2 and '20 of 20 messages never reached the line' in r.output, r.output\n"
    )
    run_without_modules(code, ("torch", "timm", "sklearn", "matplotlib"))  # the station and the sinks too
    assert len(_records(tmp_path / "o")) == 20
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["ui"]["url"].startswith("http://127.0.0.1:") and summary["sinks"][0]["offered"] == 20


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
    result = runner.invoke(app, ["eval", str(run_dir / "model.pt"), "--data", str(synthetic_mvtec), "--out", str(tmp_path / "ev"), "--gif"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    with Image.open(tmp_path / "ev" / "results.gif") as animation:  # every test image but at most 24, across the defect types
        assert animation.n_frames == min(24, 10) and animation.is_animated
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)
    assert ev["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"], abs=1e-6)
    result = runner.invoke(app, ["table", str(run_dir), str(tmp_path / "ev")])  # the run and its evaluation: two runs of one method
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "**Image AUROC**" and lines[2] == "| method | mean | weave |"
    row = lines[4]  # the student's row: the mean over categories, then per category the mean and the range over runs
    value = f"{metrics['image_auroc']:.3f}"
    assert row.startswith("| stfpm-edge, student, 2 runs | ") and f"{value} ({value}–{value})" in row
    assert "**Pixel F1**" in lines and any(line.startswith("| STFPM, authors (ResNet-18) | ") for line in lines)
    assert "**At the tool's own threshold**" in result.output and "weave AUPRO" in result.output


@pytest.mark.parametrize("breakage, named", [
    ("test_image", "000.png"),
    ("mask_size", "_mask.png"),
])
def test_test_set_faults_are_found_before_training(synthetic_mvtec, tmp_path, breakage, named):
    import shutil

    import cv2
    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(synthetic_mvtec, data)
    defect = next(d for d in (data / "test").iterdir() if d.name != "good")
    if breakage == "test_image":
        (defect / "000.png").write_bytes(b"\x89PNG broken")
    else:
        mask = next((data / "ground_truth" / defect.name).iterdir())
        cv2.imwrite(str(mask), np.zeros((10, 10), np.uint8))
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "o"), "--size", "64", "--epochs", "1"])
    assert result.exit_code == 2 and named in result.output, result.output
    assert not (tmp_path / "o").exists()  # found before training: no run folder, no last.pt


@pytest.mark.parametrize("yaml_text, message", [
    ("epochs: 1.7", "whole number"),
    ("batch_size: true", "must be a number"),
    ("false_call_rate: 7", "false-call rate"),
    ("threshold_quantile: 0.99", "threshold_quantile is no longer an option: the threshold is set for a false-call rate"),
])
def test_config_values_are_not_silently_coerced(synthetic_mvtec, tmp_path, yaml_text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {synthetic_mvtec}\n{yaml_text}\n")
    with pytest.raises(StfpmError, match=message):
        load_config(cfg)


@pytest.mark.parametrize("yaml_text, message", [
    ('epochs: !!python/object/apply:os.system ["touch pwned"]', "line 2: not valid YAML: a !!python tag is not allowed"),
    ("epochs: [1, 2", "line 3: not valid YAML: expected ',' or ']'"),
])
def test_a_bad_config_file_is_one_line_naming_file_and_line(synthetic_mvtec, tmp_path, yaml_text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {synthetic_mvtec}\n{yaml_text}\n")
    result = CliRunner().invoke(app, ["train", "--config", str(cfg)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {cfg}, {message}"), result.output
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_run_rejects_bad_numbers_and_exits_nonzero_when_nothing_was_inspected(exported, tmp_path):
    _, onnx_path = exported
    video = tmp_path / "v.mp4"
    _write_video(video, 9, size=(64, 64))
    for args in (["--max-frames", "-5"], ["--threads", "-3"], ["--line-scan", "--overlap", "1.5"],
                 ["--save-video", str(tmp_path)], ["--save-video", str(tmp_path / "out.txt")],
                 ["--sink", "ftp://x/y"], ["--sink", "mqtt://u:pw@h/t?qos=9"], ["--sink", "modbus://h/coil/x"],
                 ["--line-scan", "--ui", "127.0.0.1:0"], ["--ui", "192.0.2.1:8080"], ["--pace", "0"]):
        result = runner.invoke(app, ["run", str(onnx_path), "--source", str(video), "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and "Traceback" not in result.output and "pw" not in result.output, (args, result.output)
        assert not (tmp_path / "x").exists()  # refused before the run folder is claimed
    result = runner.invoke(app, ["run", str(onnx_path), "--source", str(video), "--out", str(tmp_path / "roi"), "--roi", "500,500,10,10"])
    assert result.exit_code == 2 and "nothing was inspected" in result.output and "9 frame(s) read, 9 failed" in result.output
    result = runner.invoke(app, ["run", str(onnx_path), "--source", str(video), "--out", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output


def test_huge_model_size_is_one_clear_line(synthetic_mvtec, tmp_path):
    result = runner.invoke(app, ["train", "--data", str(synthetic_mvtec), "--out", str(tmp_path / "o"), "--size", "99984"])
    assert result.exit_code == 2 and "too large" in result.output and "Traceback" not in result.output


def test_resume_keeps_the_runs_own_settings(synthetic_mvtec, tmp_path):
    out = tmp_path / "r"
    first = runner.invoke(app, ["train", "--data", str(synthetic_mvtec), "--out", str(out), "--size", "64", "--batch-size", "4", "--epochs", "1",
                                "--reference", "student"])
    assert first.exit_code == 0, first.output
    state = json.loads((out / "config.json").read_text())
    assert state["height"] == 64 and state["batch_size"] == 4
    bad = runner.invoke(app, ["train", "--data", str(synthetic_mvtec), "--out", str(out), "--epochs", "2", "--resume", "--size", "128"])
    assert bad.exit_code == 2 and "height was 64 in this run, now 128" in bad.output, bad.output
    cfg = load_config(None, {"data": str(synthetic_mvtec), "epochs": 2}, stored=state)
    assert (cfg.height, cfg.batch_size, cfg.epochs) == (64, 4, 2)  # stored settings, new epoch count
    assert cfg.reference == "student"
    # a run stored before the memory reference existed was a student, whatever today's default
    old = {k: v for k, v in state.items() if k not in ("reference", "bank_size")}
    assert load_config(None, {"data": str(synthetic_mvtec)}, stored=old).reference == "student"
    with pytest.raises(StfpmError, match="reference was 'student' in this run, now 'memory'"):
        load_config(None, {"data": str(synthetic_mvtec), "reference": "memory"}, stored=old)


def test_a_run_folder_belongs_to_one_run(exported, tmp_path):
    import os

    from stfpm_edge.stream.outputs import RunFolder

    _, onnx_path = exported
    video = tmp_path / "v.mp4"
    _write_video(video, 5, size=(64, 64))
    out = tmp_path / "o"
    assert runner.invoke(app, ["run", str(onnx_path), "--source", str(video), "--out", str(out)]).exit_code == 0
    before = (out / "frames.jsonl").read_text()
    second = runner.invoke(app, ["run", str(onnx_path), "--source", str(video), "--out", str(out)])
    assert second.exit_code == 2 and "results of an earlier run" in second.output
    assert (out / "frames.jsonl").read_text() == before and not (out / ".run.lock").exists()
    live = tmp_path / "live"
    with RunFolder(live):  # a run that is alive holds the lock
        busy = runner.invoke(app, ["run", str(onnx_path), "--source", str(video), "--out", str(live)])
        assert busy.exit_code == 2 and f"PID {os.getpid()}" in busy.output
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".run.lock").write_text("999999999")  # its process is gone
    assert runner.invoke(app, ["run", str(onnx_path), "--source", str(video), "--out", str(stale)]).exit_code == 0
    (tmp_path / "afile").write_text("x")
    assert "names a file" in runner.invoke(app, ["run", str(onnx_path), "--source", str(video), "--out", str(tmp_path / "afile")]).output


def test_full_disk_in_train_is_one_line(synthetic_mvtec, tmp_path, monkeypatch):
    import errno

    import stfpm_edge.fileio as fileio

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fileio, "atomic_write_bytes", no_space)
    import stfpm_edge.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", no_space)
    result = runner.invoke(app, ["train", "--data", str(synthetic_mvtec), "--out", str(tmp_path / "o"), "--size", "64", "--epochs", "1"])
    assert result.exit_code == 2 and "No space left on device" in result.output and "Traceback" not in result.output


def _run_with_file_size_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """The real CLI in a process whose files cannot grow past ``limit`` bytes: writes beyond fail (EFBIG), as on a full disk."""
    import resource

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the failing write returns an error instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "stfpm_edge.cli", *args], capture_output=True, text=True, timeout=300, preexec_fn=limit_files)


def test_a_video_the_disk_could_not_hold_is_reported_with_a_nonzero_exit(exported, tmp_path):
    """OpenCV's writer fails silently: the run reopens the video, says it is broken on stderr and in the summary, exits 2."""
    _, onnx_path = exported
    video = tmp_path / "v.mkv"
    from stfpm_edge.demo import make_video

    make_video(video, 60, (240, 320), every=20, seed=0)  # a fine texture: the annotated MPEG-4 grows past the limit
    out = tmp_path / "o"
    res = _run_with_file_size_limit(["run", str(onnx_path), "--source", str(video), "--out", str(out), "--save-video", str(tmp_path / "saved.mp4"),
                                     "--no-save-anomalies"], 300_000)
    summary = json.loads((out / "summary.json").read_text())
    assert res.returncode == 2 and "error: --save-video:" in res.stderr and "saved.mp4" in res.stderr, res.stderr
    assert summary["frames_inspected"] == 60 and len([r for r in _records(out) if "status" in r]) == 60  # every verdict kept (besides events such as drift)
    assert summary["video_error"] and summary["output_failures"][-1]["output"] == "VideoOutput"
    ok = runner.invoke(app, ["run", str(onnx_path), "--source", str(video), "--out", str(tmp_path / "fine"), "--save-video", str(tmp_path / "fine.mp4")])
    assert ok.exit_code == 0 and "video_error" not in json.loads((tmp_path / "fine" / "summary.json").read_text())


def test_summary_is_written_on_a_full_disk_into_the_space_reserved_at_the_start(exported, tmp_path, monkeypatch):
    import errno

    import stfpm_edge.fileio as fileio

    _, onnx_path = exported
    video = tmp_path / "v.mp4"
    _write_video(video, 20, size=(64, 64))

    def no_space(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fileio, "atomic_write_json", no_space)  # the disk is full by the end of the run
    out = tmp_path / "o"
    result = runner.invoke(app, ["run", str(onnx_path), "--source", str(video), "--out", str(out)])
    assert result.exit_code == 2 and "space reserved" in result.output, result.output
    summary = json.loads((out / "summary.json").read_text())  # whole JSON, the reservation's padding is whitespace
    assert summary["frames_read"] == summary["frames_inspected"] == 20 and summary["status"] == "finished"
    assert summary["summary_in_reserved_space"] is True and len([r for r in _records(out) if "status" in r]) == 20


def test_help_prints_the_defaults_it_states():
    """The help texts end in "[default: ...]": printed as written, not swallowed as a markup tag."""
    out = runner.invoke(app, ["train", "--help"], terminal_width=100).output
    flat = " ".join(out.split())
    assert "[default: 0.01]" in flat and "[default: memory]" in flat
    assert "student: constant (the paper) or decay" in flat and "the last fifth of --epochs) [default: decay]" in flat


def test_train_help_lists_at_most_thirty_options_and_names_the_config_only_ones():
    out = runner.invoke(app, ["train", "--help"], terminal_width=200).output
    import re

    options = set(re.findall(r"^\W*(--[a-z][a-z-]+)", out, flags=re.M)) - {"--help"}
    assert len(options) <= 30, sorted(options)
    assert "--synthetic" not in options and "--memory-target" not in options and "--average-epochs" not in options
    assert "memory_aggregate" in " ".join(out.split())  # the settings without a flag are named: a --config file takes them
