"""Training end to end on generated data: outputs, checkpoint, resume, reproducibility, CLI errors."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from stfpm_edge.checkpoint import load_checkpoint, read_checkpoint
from stfpm_edge.config import STUDENT_LEVERS, TrainConfig, load_config
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
    base = dict(data=str(data), out=str(out), epochs=2, batch_size=8, height=64, width=64, lr=0.05, overlays=0, reference="student")
    base.update(kw)
    return load_config(None, base)


@pytest.mark.slow
@pytest.mark.parametrize("levers", [{}, dict(lr_schedule="decay", hard_fraction=0.2, feature_norm="channel", augment="rotate")],
                         ids=["paper", "student-levers"])
def test_resume_continues_and_matches_uninterrupted_run(synthetic_mvtec, tmp_path, monkeypatch, levers):
    # with the levers: the schedule's position and the generator that draws the augmentations resume too
    def make(data, out, **kw):
        return _cfg(data, out, **levers, **kw)

    _, full = train(make(synthetic_mvtec, tmp_path / "full", epochs=2), progress=False)
    history = load_checkpoint(tmp_path / "full" / "model.pt")[1]["training"]["history"]
    assert len(history) == 2 and all(h["train_loss"] > 0 for h in history)
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
        train(make(synthetic_mvtec, tmp_path / "resumed", epochs=2), progress=False)
    assert (tmp_path / "resumed" / LAST).is_file() and not (tmp_path / "resumed" / "model.pt").exists()
    monkeypatch.setattr(tr, "run_epoch", real)
    with pytest.raises(StfpmError, match="--resume"):
        train(make(synthetic_mvtec, tmp_path / "resumed", epochs=2), progress=False)
    _, resumed = train(make(synthetic_mvtec, tmp_path / "resumed", epochs=2), resume=True, progress=False)
    assert resumed["threshold"] == pytest.approx(full["threshold"], rel=1e-4)
    assert resumed["image_auroc"] == pytest.approx(full["image_auroc"], abs=1e-6)
    with pytest.raises(StfpmError, match="nothing to resume"):
        train(make(synthetic_mvtec, tmp_path / "resumed", epochs=2), resume=True, progress=False)


def test_a_student_standardised_at_the_deepest_level_only_reloads_and_exports_as_one_graph(synthetic_mvtec, tmp_path):
    from stfpm_edge.export.onnx_export import export_onnx, parity_ok, verify_export
    from stfpm_edge.model import FeatureNorm

    run_dir, _ = train(_cfg(synthetic_mvtec, tmp_path / "run", epochs=1, feature_norm="deep"), progress=False)
    model, meta = load_checkpoint(run_dir / "model.pt")
    assert meta["feature_norm"] == "deep" and isinstance(model.teacher, FeatureNorm)
    assert model.metric == ("cosine", "cosine", "l2") and model.teacher.standardised == (2,)
    x = model.normalize(torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8))
    with torch.inference_mode():
        std, raw = model.teacher(x), model.teacher.net(x)
    assert torch.equal(std[0], raw[0]) and not torch.allclose(std[2], raw[2])
    export_onnx(run_dir / "model.pt", tmp_path / "m.onnx")
    ok, problems = parity_ok(verify_export(tmp_path / "m.onnx", run_dir / "model.pt", synthetic_mvtec, progress=False))
    assert ok, problems


def test_a_feature_normalised_student_standardises_the_teacher_and_exports_as_one_graph(synthetic_mvtec, tmp_path):
    from stfpm_edge.datasets import discover, heldout_splits
    from stfpm_edge.export.onnx_export import export_onnx, parity_ok, verify_export
    from stfpm_edge.geometry import Geometry
    from stfpm_edge.model import FeatureNorm
    from stfpm_edge.store import TrainingStore

    cfg = _cfg(synthetic_mvtec, tmp_path / "run", epochs=1, feature_norm="channel")
    run_dir, metrics = train(cfg, progress=False)
    model, meta = load_checkpoint(run_dir / "model.pt")
    assert meta["feature_norm"] == "channel" and isinstance(model.teacher, FeatureNorm)
    # on the good training images the loaded teacher's levels have mean 0 and spread 1 per channel (or less: a floored channel)
    train_samples = heldout_splits(discover(cfg.data, seed=cfg.seed).train, cfg.val_fraction, cfg.calib_fraction, cfg.seed)[0]
    with TrainingStore() as store:
        imgs = store.images("train", train_samples, Geometry(64, 64, "squash"), False, "")
        with torch.inference_mode():
            feats = model.teacher(model.normalize(torch.from_numpy(imgs[: len(imgs)])))
    for f in feats:
        assert f.mean(dim=(0, 2, 3)).abs().max() < 1e-3
        spread = f.std(dim=(0, 2, 3), correction=0)
        assert spread.max() < 1.0 + 1e-3 and (spread > 0.999).float().mean() > 0.5
    export_onnx(run_dir / "model.pt", tmp_path / "m.onnx")  # the standardisation is two more nodes per level of the one graph
    ok, problems = parity_ok(verify_export(tmp_path / "m.onnx", run_dir / "model.pt", synthetic_mvtec, progress=False))
    assert ok, problems
    assert metrics["image_auroc"] is not None


def test_retired_options_load_when_they_were_off_and_are_refused_when_they_were_on(synthetic_mvtec, tmp_path, tiny_run):
    """A setting that left the product: a config, a resumed run or a checkpoint that had it off still loads (it changed
    nothing); one that had it on is refused with why it left (docs/results.md holds the measurement)."""
    from stfpm_edge.checkpoint import atomic_torch_save

    cfg = tmp_path / "old.yaml"
    cfg.write_text(f"data: {synthetic_mvtec}\nsynthetic: 0.0\naverage_epochs: 0\nstudent_backbone: ''\nlr_schedule: decay\n")
    assert load_config(cfg).lr_schedule == "decay"
    cfg.write_text(f"data: {synthetic_mvtec}\nsynthetic: 0.5\n")
    with pytest.raises(StfpmError, match=r"synthetic 0.5 is no longer an option: synthetic defects .* \(0.617 against 0.637"):
        load_config(cfg)
    with pytest.raises(StfpmError, match="lr_schedule 'cosine' is no longer a choice"):
        load_config(None, dict(data=str(synthetic_mvtec), lr_schedule="cosine"))
    with pytest.raises(StfpmError, match="--resume: .* memory_target 1.0 is no longer an option"):
        load_config(None, dict(data=str(synthetic_mvtec)), stored={"data": str(synthetic_mvtec), "memory_target": 1.0})
    run_dir, _ = tiny_run
    payload = read_checkpoint(run_dir / "model.pt")
    payload["meta"]["config"].update(synthetic=0.0, average_epochs=0.0, memory_target=0.0)
    payload["meta"]["student_backbone"] = payload["meta"]["backbone"]  # checkpoints before the option left named it
    atomic_torch_save(tmp_path / "off.pt", payload)
    load_checkpoint(tmp_path / "off.pt")
    payload["meta"]["student_backbone"] = "tf_efficientnet_lite1"
    atomic_torch_save(tmp_path / "on.pt", payload)
    with pytest.raises(ModelFileError, match="student_backbone 'tf_efficientnet_lite1' is no longer an option"):
        load_checkpoint(tmp_path / "on.pt")


def test_a_student_must_have_the_teachers_widths_and_a_memory_has_no_student(synthetic_mvtec, tmp_path):
    from stfpm_edge.backbones import create_features
    from stfpm_edge.model import STFPM, create_student

    teacher = create_features("tf_efficientnet_lite0")
    with pytest.raises(StfpmError, match=r"levels of \[24, 48, 120\] channels, the teacher's have \[24, 40, 112\]"):
        create_student("tf_efficientnet_lite2", None, teacher)
    assert isinstance(STFPM.build("tf_efficientnet_lite0", pretrained=False).student, torch.nn.Module)
    with pytest.raises(StfpmError, match="feature_norm applies to a student"):
        _cfg(synthetic_mvtec, tmp_path, reference="memory", feature_norm="channel")


def test_channel_stats_are_the_per_channel_mean_and_floored_spread():
    from stfpm_edge.model import STD_FLOOR, channel_stats

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 5, 6, generator=g) * torch.tensor([1.0, 2.0, 3.0, 0.0]).view(1, 4, 1, 1) + 7.0
    b = torch.randn(2, 4, 5, 6, generator=g) * torch.tensor([1.0, 2.0, 3.0, 0.0]).view(1, 4, 1, 1) + 7.0
    (mean,), (std,) = channel_stats(iter([[a], [b]]))  # two batches of one level, streamed
    both = torch.cat([a, b])
    assert torch.allclose(mean, both.mean(dim=(0, 2, 3)), atol=1e-5)
    true = both.std(dim=(0, 2, 3), correction=0)
    assert torch.allclose(std[:3], true[:3], atol=1e-4)
    assert std[3] == pytest.approx(STD_FLOOR * float(true.median()), rel=1e-4)  # the constant channel gets the floor
    with pytest.raises(StfpmError, match="at least one image"):
        channel_stats(iter([]))


@pytest.mark.slow
def test_teacher_cache_gives_the_same_training(synthetic_mvtec, tmp_path):
    # the cache applies without augmentation (with it the teacher must see each augmented batch)
    _, cached = train(_cfg(synthetic_mvtec, tmp_path / "a", epochs=1, cache_teacher=True, augment="none"), progress=False)
    _, uncached = train(_cfg(synthetic_mvtec, tmp_path / "b", epochs=1, cache_teacher=False, augment="none"), progress=False)
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


@pytest.mark.parametrize("mode", ["flip", "rot90", "rotate"])
def test_augmentation_keeps_shape_and_changes_images(mode):
    from stfpm_edge.train import augment

    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32) / 1000
    g = torch.Generator().manual_seed(3)
    outs = [augment(x, mode, g) for _ in range(6)]
    assert all(o.shape == x.shape for o in outs)
    assert any(not torch.allclose(o, x) for o in outs)  # something moved in six draws
    if mode != "rotate":  # flips and quarter turns permute pixels, never invent values
        assert all(torch.equal(o.flatten(1).sort(1).values, x.flatten(1).sort(1).values) for o in outs)
    assert torch.equal(augment(x, "none", g), x)


def test_old_configs_with_boolean_augment_still_load(synthetic_mvtec, tmp_path):
    assert load_config(None, dict(data=str(synthetic_mvtec), augment=True)).augment == "flip"
    assert load_config(None, dict(data=str(synthetic_mvtec), augment=False)).augment == "none"
    with pytest.raises(StfpmError, match="augment must be one of"):
        load_config(None, dict(data=str(synthetic_mvtec), augment="twirl"))
    with pytest.raises(StfpmError, match="must leave images to train on"):
        load_config(None, dict(data=str(synthetic_mvtec), val_fraction=0.5, calib_fraction=0.5))
    with pytest.raises(StfpmError, match="level weights must be comma-separated numbers"):
        load_config(None, dict(data=str(synthetic_mvtec), level_weights="0,x,1"))


def test_a_new_student_takes_the_winning_levers_and_a_resumed_or_paper_run_keeps_its_own(synthetic_mvtec):
    data = str(synthetic_mvtec)
    student = load_config(None, dict(data=data, reference="student"))
    assert (student.hard_fraction, student.feature_norm, student.level_weights) == (0.1, "deep", "0.25,0.25,1")
    # the rate decays over the last fifth and the trained weights are kept (docs/results.md: they beat the average once it decays)
    assert (student.topk_fraction, student.lr_schedule) == (0.01, "decay")
    assert student.batch_size == 16 and load_config(None, dict(data=data, reference="student", batch_size=32)).batch_size == 32
    assert load_config(None, dict(data=data, reference="student", layers="1,2")).level_weights == "0.25,1"  # one per level
    assert load_config(None, dict(data=data, reference="student", layers="3")).level_weights == "1"
    memory = load_config(None, dict(data=data))
    assert (memory.hard_fraction, memory.feature_norm, memory.level_weights, memory.topk_fraction) == (0.0, "none", "", 0.01)
    assert memory.lr_schedule == "constant" and memory.batch_size == 32
    given = load_config(None, dict(data=data, reference="student", hard_fraction=0.0, level_weights="0,0,1"))
    assert (given.hard_fraction, given.feature_norm, given.level_weights) == (0.0, "deep", "0,0,1")
    paper = load_config(Path(__file__).parents[1] / "configs" / "paper.yaml", dict(data=data))
    assert (paper.reference, paper.hard_fraction, paper.feature_norm, paper.level_weights) == ("student", 0.0, "none", "")
    assert (paper.topk_fraction, paper.lr_schedule, paper.batch_size) == (0.0, "constant", 32)
    quick = load_config(Path(__file__).parents[1] / "configs" / "student-quick.yaml", dict(data=data))
    assert (quick.reference, quick.epochs, quick.batch_size, quick.lr) == ("student", 33, 16, 0.4)  # the faster schedule, on
    assert all(getattr(quick, k) == getattr(student, k) for k in STUDENT_LEVERS)  # the student's own defaults
    # a run stored before these defaults lacks them: resumed, it keeps the paper's
    old = {k: v for k, v in paper.to_dict().items() if k not in STUDENT_LEVERS}
    resumed = load_config(None, dict(data=data), stored=old)
    assert all(getattr(resumed, k) == getattr(TrainConfig(), k) for k in STUDENT_LEVERS)


def test_levers_train_and_travel_in_the_checkpoint(synthetic_mvtec, tmp_path):
    """Rotation, bf16, a calibration split, other levels, a blurred map and a top-k score: trained,
    stored, and reloaded into the same model."""
    cfg = _cfg(synthetic_mvtec, tmp_path / "levers", epochs=1, augment="rotate", amp="bf16", calib_fraction=0.25,
               layers="1,2", blur_sigma=2.0, topk_fraction=0.01, level_weights="0.5,1")
    run_dir, m = train(cfg, progress=False)
    model, meta = load_checkpoint(run_dir / "model.pt")
    assert meta["layers"] == [1, 2] and meta["map_post"] == {"blur_sigma": 2.0, "topk_fraction": 0.01, "level_weights": [0.5, 1.0]}
    assert model.post.level_weights == (0.5, 1.0)
    # a student's threshold rests on its calibration and validation splits: here 4 + 2 good images, too few for a tail fit
    assert meta["dataset"]["n_calib"] == 4 and meta["threshold"]["sources"] == f"4 calibration + {meta['dataset']['n_val']} validation"
    assert meta["threshold"]["rule"] == "max" and "at least 20" in meta["threshold"]["warning"]
    assert len(model.teacher.feature_info.channels()) == 2 and model.post.topk(64, 64) == 41
    assert m["false_alarm_rate"] is not None and 0.0 <= m["false_alarm_rate"] <= 1.0


def test_a_level_weight_count_mismatch_fails_before_any_image_is_decoded(synthetic_mvtec, tmp_path, monkeypatch):
    from stfpm_edge.store import TrainingStore

    def no_decoding(*args, **kwargs):
        raise AssertionError("images were decoded before the level weights were checked")

    monkeypatch.setattr(TrainingStore, "images", no_decoding)
    cfg = _cfg(synthetic_mvtec, tmp_path / "mismatch", epochs=1, layers="1,2", level_weights="0,0,1")
    with pytest.raises(StfpmError, match="3 level weights .* 2 feature levels"):
        train(cfg, progress=False)
    assert not (tmp_path / "mismatch").exists()


def test_memory_reference_trains_without_epochs_exports_at_parity_and_reloads(synthetic_mvtec, tmp_path):
    from typer.testing import CliRunner

    from stfpm_edge.cli import app
    from stfpm_edge.model import MemoryBank

    cfg = load_config(None, dict(data=str(synthetic_mvtec), out=str(tmp_path / "run"), height=64, width=64, epochs=1,
                                 reference="memory", bank_size=300, threads=1, overlays=0))
    run_dir, metrics = train(cfg, progress=False)
    assert metrics["reference"] == "memory" and metrics["epochs"] == 0
    model, meta = load_checkpoint(run_dir / "model.pt")
    n = meta["dataset"]["n_train"]
    # the default search pools strides 4 and 8 by 2: at 64 px 8x8, 4x4 and 4x4 positions per image, the last two fewer than 300 in all
    assert metrics["memory"]["search"] == {"aggregate": 1, "pool": [2, 2, 1]}
    assert metrics["memory"]["rows_per_level"] == [300, 16 * n, 16 * n] and 16 * n < 300
    assert metrics["image_auroc"] > 0.9  # the generated defects stand out of the teacher's own good features
    assert isinstance(model.student, MemoryBank) and [len(b) for b in model.student.banks()] == [300, 16 * n, 16 * n]
    assert "student" not in read_checkpoint(run_dir / "model.pt")
    # the threshold rests on every good image: both held-out splits, and each bank image scored without its own rows
    stats, d = meta["normal_stats"], meta["dataset"]
    assert stats["heldout_sources"] == [["calibration", d["n_calib"]], ["validation", d["n_val"]], ["bank images, own rows left out", d["n_train"]]]
    assert len(stats["heldout_scores"]) == d["n_val"] + d["n_calib"] + d["n_train"]
    assert meta["threshold"]["n_scores"] == len(stats["heldout_scores"]) and meta["threshold"]["image"] == metrics["threshold"]
    result = CliRunner().invoke(app, ["export", str(run_dir / "model.pt"), "--out", str(tmp_path / "m.onnx"), "--data", str(synthetic_mvtec)])
    assert result.exit_code == 0 and "parity: OK" in result.output, result.output
    with pytest.raises(StfpmError, match="reference"):
        load_config(None, dict(data=str(synthetic_mvtec), reference="knn"))


def test_memory_search_options_pool_aggregate_per_level_banks_export_at_parity(synthetic_mvtec, tmp_path):
    """Pooled and neighbourhood-averaged memory rows, one bank size per level: built, stored, exported identically."""
    from typer.testing import CliRunner

    from stfpm_edge.cli import app
    from stfpm_edge.model import MemoryBank

    # 80 px: the stride-16 level is 5x5, so pooling it by 2 leaves a ragged edge block (its own mean)
    cfg = load_config(None, dict(data=str(synthetic_mvtec), out=str(tmp_path / "run"), height=80, width=80,
                                 reference="memory", bank_size="200,100,20", memory_pool="2,1,2", memory_aggregate=3, threads=1, overlays=0))
    run_dir, metrics = train(cfg, progress=False)
    assert metrics["memory"]["rows_per_level"] == [200, 100, 20]
    assert metrics["memory"]["search"] == {"aggregate": 3, "pool": [2, 1, 2]}
    model, meta = load_checkpoint(run_dir / "model.pt")
    assert isinstance(model.student, MemoryBank) and model.student.search.pool == (2, 1, 2) and model.student.search.aggregate == 3
    with torch.inference_mode():
        t = model.teacher(model.normalize(torch.zeros(1, 80, 80, 3, dtype=torch.uint8)))
        d = model.student.distances(t)
    assert [tuple(x.shape[-2:]) for x in d] == [(10, 10), (10, 10), (3, 3)]  # 20/2, 10, ceil(5/2)
    # the whole-part term on the 5x5 deepest level: an 8x8 grid cannot be finer than the level, so 5x5 cells of one feature each;
    # one set of cells per bank image, its excess a map of the model's size, in the graph too
    assert meta["memory_whole"]["rows"] == meta["dataset"]["n_train"] and meta["memory_whole"]["gain"] > 0
    assert model.student.whole.describe(t[-1]).shape == (1, 25, t[-1].shape[1])
    assert model.student.whole.excess_map(t, (80, 80)).shape == (1, 1, 80, 80)
    assert metrics["image_auroc"] > 0.9
    result = CliRunner().invoke(app, ["export", str(run_dir / "model.pt"), "--out", str(tmp_path / "m.onnx"), "--data", str(synthetic_mvtec)])
    assert result.exit_code == 0 and "parity: OK" in result.output, result.output
    with pytest.raises(StfpmError, match="for 3 feature levels"):
        train(load_config(None, dict(data=str(synthetic_mvtec), out=str(tmp_path / "bad"), height=64, width=64, reference="memory",
                                     bank_size="100,100", threads=1, overlays=0)), progress=False)
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    for bad in (dict(bank_size="0"), dict(bank_size="many"), dict(memory_aggregate=2), dict(memory_pool="1,0,1")):
        with pytest.raises(StfpmError):
            load_config(None, dict(data=str(synthetic_mvtec), **bad))


def test_a_missing_part_is_rejected_by_the_whole_part_term_which_positions_alone_pass(tmp_path):
    """A part on a woven background; the defect is the part missing: every position of it looks like the background the memory
    holds. With positions only the threshold passes every missing part (the ranking is right, the scores too low); the whole-part
    term (the default) marks where the part should be and rejects them all, with no false call on the good test parts."""
    import cv2

    from stfpm_edge.synthetic import texture

    rng = np.random.default_rng(0)
    root = tmp_path / "part"

    def part(present):
        img = texture(rng, 96, 96)
        if present:
            cx, cy = 48 + int(rng.integers(-2, 3)), 48 + int(rng.integers(-2, 3))
            cv2.rectangle(img, (cx - 16, cy - 10), (cx + 16, cy + 10), (40, 60, 200), -1)
            for k in range(3):
                cv2.line(img, (cx - 12 + 12 * k, cy + 10), (cx - 12 + 12 * k, cy + 24), (200, 200, 200), 2)
        return img

    for sub, n, present in (("train/good", 40, True), ("test/good", 8, True), ("test/missing", 8, False)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / sub / f"{i:03d}.png"), part(present))
    runs = {}
    for w in (0.0, None):  # off, and the default
        extra = {} if w is None else {"whole_weight": w}
        cfg = load_config(None, dict(data=str(root), out=str(tmp_path / f"w{w}"), height=64, width=64, threads=1, overlays=0, **extra))
        runs[w] = train(cfg, progress=False)[1]
    assert runs[0.0]["miss_rate"] == 1.0 and runs[0.0]["good_flagged"] == 0
    assert runs[None]["miss_rate"] == 0.0 and runs[None]["good_flagged"] == 0
    assert "memory_whole" not in load_checkpoint(tmp_path / "w0.0" / "model.pt")[1]


def test_the_decay_schedule_keeps_the_rate_then_falls_over_the_last_fifth_and_resumes_where_it_was():
    from stfpm_edge.train import lr_schedule

    def rates(epochs, resume_at=None):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.4)
        sched = lr_schedule(opt, "decay", epochs)
        out = []
        for e in range(epochs):
            if e == resume_at:  # a resumed run builds a new optimiser and schedule and loads their states
                state = (opt.state_dict(), sched.state_dict())
                opt = torch.optim.SGD([p], lr=0.4)
                sched = lr_schedule(opt, "decay", epochs)
                opt.load_state_dict(state[0])
                sched.load_state_dict(state[1])
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    r = rates(100)
    assert r[:80] == [0.4] * 80  # constant for four fifths
    assert all(a > b > 0 for a, b in zip(r[79:], r[80:]))  # then strictly falling, never reaching 0
    assert r[-1] == pytest.approx(0.4 / 21)
    assert rates(100, resume_at=90) == pytest.approx(r)
    assert lr_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4), "constant", 100) is None
    with pytest.raises(StfpmError, match="lr_schedule"):
        load_config(None, dict(data="x", lr_schedule="step"))


def test_a_bank_image_left_out_scores_as_against_a_memory_built_without_it():
    """``own_rows_left_out_scores`` on a memory that keeps every row: image i's score is its score against a memory of
    the other images' features, and never lower than against the full memory."""
    from stfpm_edge.model import STFPM, MemoryBank, MemorySearch, memory_rows
    from stfpm_edge.train import own_rows_left_out_scores

    torch.manual_seed(0)
    model = STFPM.build("tf_efficientnet_lite0", pretrained=False).eval()
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    search = MemorySearch()
    with torch.inference_mode():
        rows = memory_rows(model.teacher(model.normalize(torch.from_numpy(images))), search)  # per level [4, h, w, C]
    banks = [r.reshape(-1, r.shape[-1]) for r in rows]
    owners = [torch.arange(4).repeat_interleave(r.shape[1] * r.shape[2]) for r in rows]
    model.student = MemoryBank(banks, search)
    with torch.inference_mode():
        full = model(torch.from_numpy(images))[1].numpy()
    left_out = own_rows_left_out_scores(model, images, owners)
    assert isinstance(model.student, MemoryBank) and len(model.student.banks()[0]) == len(banks[0])  # the full memory is back
    for i in range(4):
        others = MemoryBank([b[o != i] for b, o in zip(banks, owners)], search)
        with torch.inference_mode():
            model.student, keep = others, model.student
            alone = float(model(torch.from_numpy(images[i : i + 1]))[1][0])
            model.student = keep
        assert left_out[i] == pytest.approx(alone, rel=1e-5) and left_out[i] >= full[i] - 1e-7
    assert (left_out > full + 1e-6).any()  # its own rows made each image a perfect match; without them it is not
    drawn = own_rows_left_out_scores(model, images, owners, limit=2, seed=1)  # a large class: a seeded draw of the images
    assert len(drawn) == 2 and all(any(v == pytest.approx(w, rel=1e-6) for w in left_out) for v in drawn)


def test_the_input_size_follows_the_training_images_aspect_unless_given(tmp_path):
    """A part 2.5 times as wide as tall gets a 160x400 input (the default pixel count at its aspect), stored in the run's
    config and checkpoint and used by evaluation and export; square images keep 256x256; --size still decides."""
    from stfpm_edge.geometry import auto_size
    from stfpm_edge.synthetic import make_mvtec_like

    assert auto_size([(100, 250)] * 5) == (160, 400) and auto_size([(250, 100)]) == (400, 160)
    assert auto_size([(512, 512), (500, 540)]) == (256, 256) and auto_size([(100, 120)]) == (256, 256)  # within 1.25:1: square
    wide = make_mvtec_like(tmp_path / "wide", n_train=8, n_test_good=2, n_test_defect=3, height=48, width=120, seed=3)
    run_dir, metrics = train(load_config(None, dict(data=str(wide), out=str(tmp_path / "auto"), overlays=0, bank_size="64")), progress=False)
    model, meta = load_checkpoint(run_dir / "model.pt")
    assert (meta["geometry"]["height"], meta["geometry"]["width"]) == (160, 400) and meta["config"]["height"] == 160
    assert json.loads((run_dir / "config.json").read_text())["width"] == 400 and metrics["image_auroc"] is not None
    given = load_config(None, dict(data=str(wide), out=str(tmp_path / "given"), overlays=0, bank_size="64", height=64, width=64))
    _, meta = load_checkpoint(train(given, progress=False)[0] / "model.pt")
    assert (meta["geometry"]["height"], meta["geometry"]["width"]) == (64, 64)


def test_update_adds_good_images_to_a_memory_in_place_of_a_retraining(synthetic_mvtec, tmp_path, tiny_run):
    """Defective-looking images an operator marked good: after `update` they score as good (their features are in the
    memory), the threshold is set again by the model's rule, a history entry says what happened; a student is refused."""
    from typer.testing import CliRunner

    from stfpm_edge.cli import app
    from stfpm_edge.datasets import Sample, list_images, load_images
    from stfpm_edge.engines.torch_engine import TorchEngine
    from stfpm_edge.geometry import Geometry

    run_dir, _ = train(load_config(None, dict(data=str(synthetic_mvtec), out=str(tmp_path / "mem"), height=64, width=64, overlays=0,
                                              bank_size="300")), progress=False)
    marked = tmp_path / "feedback" / "good"
    marked.mkdir(parents=True)
    for p in list_images(synthetic_mvtec / "test" / "hole")[:2]:
        (marked / p.name).write_bytes(p.read_bytes())
    images, _ = load_images([Sample(p, 0) for p in list_images(marked)], Geometry(64, 64))
    with TorchEngine(run_dir / "model.pt") as before:
        scores_before, old = before.infer(images)[1], before.threshold
    assert (scores_before > old).all()  # the model calls them anomalous
    result = CliRunner().invoke(app, ["update", str(run_dir / "model.pt"), "--add-good", str(marked), "--out", str(tmp_path / "new.pt")])
    assert result.exit_code == 0, result.output
    assert "added 2 good images (2 of them above the old threshold)" in result.output
    with TorchEngine(tmp_path / "new.pt") as after:
        scores_after, new = after.infer(images)[1], after.threshold
        meta = after.meta
    assert (scores_after <= new).all() and scores_after.max() < 1e-5  # their own features are in the memory now
    (event,) = meta["updates"]
    assert meta["memory_whole"]["rows"] == meta["dataset"]["n_train"] + 2  # their layouts join the whole-part term's good images
    assert event["added_good_images"] == 2 and event["old_threshold"] == old and event["new_threshold"] == new
    assert meta["threshold"]["n_scores"] == len(meta["normal_stats"]["heldout_scores"]) and meta["threshold"]["history"][-1]["image"] == old
    refused = CliRunner().invoke(app, ["update", str(tiny_run[0] / "model.pt"), "--add-good", str(marked), "--out", str(tmp_path / "s.pt")])
    assert refused.exit_code == 2 and "a student model learns good images by training" in refused.output
