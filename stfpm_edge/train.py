"""Training harness: data, the student's optimisation, best-validation checkpoint, threshold, evaluation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .backbones import resolve_layers, spec
from .checkpoint import atomic_torch_save, load_checkpoint, save_checkpoint
from .config import TrainConfig, parse_counts, parse_layers, parse_weights, per_level
from .datasets import check_test_set, discover, evenly_spaced, heldout_splits
from .drift import reference_of
from .errors import StfpmError
from .evaluate import evaluate, predict, write_outputs
from .fileio import atomic_write_json, sha256_file
from .geometry import Geometry, auto_size, decode_image
from .model import (
    STANDARDISED_LEVELS,
    STFPM,
    FeatureNorm,
    MapPost,
    MemoryBank,
    MemorySearch,
    WholePart,
    channel_stats,
    check_level_count,
    coreset_levels,
    memory_rows,
    stfpm_loss,
)
from .store import TrainingStore
from .thresholds import fit_threshold, normal_statistics, refit_threshold

AUTO_SIZE_SAMPLES = 32  # training images whose size sets an automatic input size (evenly spaced over the set)
LAST = "last.pt"  # resume state, rewritten atomically after every epoch
MODEL = "model.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StfpmError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StfpmError(f"--device {name}: PyTorch sees no CUDA GPU here; use --device cpu")
    return device


def default_run_dir(cfg: TrainConfig, name: str) -> Path:
    return Path("runs") / f"{name}-{cfg.backbone}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class TeacherCache:
    """The frozen teacher's features for a fixed set of images, computed once (no augmentation).

    Kept in record files of the training store (FP32, exact), read back batch by batch in the memory layout the
    teacher gave (channels-last): a distance summed over channels in another layout sums in another order, and the
    last-bit differences, amplified by training, would make a cached run differ from an uncached one.
    """

    def __init__(self, model: STFPM, images, batch_size: int, store: TrainingStore, name: str):
        self.device = next(model.parameters()).device
        self.levels: list = []
        self.channels_last: list[bool] = []
        with torch.inference_mode():
            for feats in teacher_batches(model, images, batch_size):
                if not self.levels:
                    self.levels = [store.records(f"{name}-teacher{k}", f.shape[1:], np.float32) for k, f in enumerate(feats)]
                    self.channels_last = [f.dim() == 4 and f.is_contiguous(memory_format=torch.channels_last) for f in feats]
                for rec, f in zip(self.levels, feats):
                    rec.append(f.float().cpu().numpy())

    def __getitem__(self, idx: torch.Tensor) -> list[torch.Tensor]:
        rows = np.asarray(idx)
        out = [torch.from_numpy(rec[rows]).to(self.device) for rec in self.levels]
        return [f.contiguous(memory_format=torch.channels_last) if last else f for f, last in zip(out, self.channels_last)]


def teacher_batches(model: STFPM, images, batch_size: int):
    """The teacher's feature levels of these images, batch by batch in order (the caller sets the grad mode)."""
    device = next(model.parameters()).device
    for i in range(0, len(images), batch_size):
        yield model.teacher(model.normalize(torch.from_numpy(images[i : i + batch_size]).to(device)))


def teacher_stats(model: STFPM, images, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per level, the channel means and spreads of the teacher's features of these (unaugmented) images."""
    with torch.inference_mode():
        return channel_stats(teacher_batches(model, images, batch_size))


def _batches(n: int, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def augment(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random geometric variation of a normalised batch [N, C, H, W], drawn per image.

    ``flip``: horizontal and vertical flips. ``rot90``: flips and quarter turns (the 8 symmetries
    of a square; half turns only on non-square inputs). ``rotate``: any angle and shifts of up to
    5% of the size, bilinear, reflecting at the borders (parts that lie at any angle on the line).
    """
    if mode == "none":
        return x
    n, dev = x.shape[0], x.device
    pick = lambda: (torch.rand(n, generator=generator) < 0.5).view(-1, 1, 1, 1).to(dev)  # noqa: E731
    if mode in ("flip", "rot90"):
        x = torch.where(pick(), x.flip(3), x)
        x = torch.where(pick(), x.flip(2), x)
        if mode == "rot90" and x.shape[2] == x.shape[3]:
            x = torch.where(pick(), x.transpose(2, 3), x)  # with the flips: all 8 symmetries
        return x
    if mode == "rotate":
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.pi
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.1  # grid units: 0.1 = 5% of the size
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    raise StfpmError(f"unknown augmentation {mode!r}")


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or None for full FP32."""
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "fp16" or (mode == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if mode == "fp16":
        raise StfpmError("--amp fp16 is for CUDA GPUs; on the CPU use bf16")
    if mode == "auto" and not _cpu_has_bf16():
        return None
    return torch.bfloat16


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def run_epoch(model: STFPM, images: np.ndarray, cache: TeacherCache | None, optimizer, cfg: TrainConfig, generator: torch.Generator,
              amp: torch.dtype | None = None, scaler=None) -> dict[str, float]:
    """One pass of the student over the training images; returns the mean batch loss against the teacher (``train_loss``,
    what validation measures, so the two compare)."""
    model.train()
    device = next(model.parameters()).device
    losses = []
    for idx in _batches(len(images), cfg.batch_size, generator):
        x = model.normalize(torch.from_numpy(images[idx.numpy()]).to(device))
        x = augment(x, cfg.augment, generator)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if cache is not None:
                t = cache[idx]
            else:
                with torch.no_grad():
                    t = model.teacher(x)
            s = model.student(x)
        loss = stfpm_loss([f.float() for f in t], [f.float() for f in s], cfg.hard_fraction, model.metric)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
    return {"train_loss": float(np.mean(losses))}


# lr_schedule "decay": the share of the epochs, at the end, over which the rate falls linearly towards 0
LR_DECAY_SHARE = 0.2


def lr_schedule(optimizer, name: str, epochs: int):
    """The rate's schedule over the run's epochs (stepped once per epoch; resumable), or None for a constant rate.

    ``decay`` keeps lr, then falls linearly over the last LR_DECAY_SHARE of the epochs (to lr / (n + 1) in the last of
    n): at a constant lr 0.4 a screw student's evaluation-mode loss spikes from epoch to epoch (1.15 -> 3.42 between two
    epochs) and its test image AUROC with it (0.11-0.92 over epochs 40-100; docs/results.md), so where a run ends
    decides what it keeps.
    """
    if name == "decay":
        n = max(1, round(LR_DECAY_SHARE * epochs))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: min(1.0, (epochs - epoch) / (n + 1)))
    return None


def validation_loss(model: STFPM, images: np.ndarray, cache: TeacherCache | None, batch_size: int) -> float:
    """The mean loss of the model's student on the validation images."""
    student = model.student
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for idx in _batches(len(images), batch_size, None):
            x = model.normalize(torch.from_numpy(images[idx.numpy()]).to(device))
            t = cache[idx] if cache is not None else model.teacher(x)
            total += float(stfpm_loss(t, student(x), metric=model.metric)) * len(idx)
            count += len(idx)
    return total / count


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train, keep the best-validation student, set the threshold, evaluate; returns (run dir, metrics).

    Images and teacher features live in a temporary training store on disk, not in memory.
    """
    with TrainingStore() as store:
        prepared = _prepare(cfg, resume, progress, store)
        training = _fit_memory(prepared, progress) if cfg.reference == "memory" else _fit(prepared, resume, progress)
        return _finish(prepared, training, progress)


@dataclass
class Prepared:
    """Everything a run needs before its first epoch (all input checked, nothing written yet)."""

    cfg: TrainConfig
    run_dir: Path
    dataset: Any
    geometry: Geometry
    splits: tuple[list, list, list]  # train, validation, calibration samples
    train_imgs: Any
    val_imgs: Any
    calib_imgs: Any
    model: STFPM
    cache_train: TeacherCache | None
    cache_val: TeacherCache | None


def _prepare(cfg: TrainConfig, resume: bool, progress: bool, store: TrainingStore) -> Prepared:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dataset = discover(cfg.data, seed=cfg.seed)
    if not cfg.height or not cfg.width:  # the input follows the images: their aspect at the default pixel count (stored as chosen)
        if cfg.height or cfg.width:
            cfg.height = cfg.width = cfg.height or cfg.width
        else:
            cfg.height, cfg.width = auto_size([decode_image(s.path).shape[:2] for s in evenly_spaced(dataset.train, AUTO_SIZE_SAMPLES)])
    geometry = Geometry(cfg.height, cfg.width, cfg.resize)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg, dataset.name)
    if run_dir.exists() and not run_dir.is_dir():
        raise StfpmError(f"{run_dir}: --out names a file; give a folder for the run")
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise StfpmError(f"{run_dir}: run folder exists and is not empty; pass --resume to continue it or choose another --out")
    if resume and not (run_dir / LAST).is_file() and (run_dir / MODEL).is_file():
        raise StfpmError(f"{run_dir}: nothing to resume, this run finished ({MODEL} is there); choose another --out to train again")
    splits = heldout_splits(dataset.train, cfg.val_fraction, cfg.calib_fraction, cfg.seed)
    post = MapPost(cfg.blur_sigma, cfg.topk_fraction, parse_weights(cfg.level_weights))
    layers = parse_layers(cfg.layers)
    check_level_count(post, len(resolve_layers(cfg.backbone, layers)))  # a mismatch fails before the images are decoded
    # decode everything up front: a bad file fails here, before anything is written
    train_imgs = store.images("train", splits[0], geometry, progress, "train images")
    val_imgs = store.images("val", splits[1], geometry, progress, "validation images")
    calib_imgs = store.images("calib", splits[2], geometry, progress, "calibration images") if splits[2] else val_imgs
    check_test_set(dataset.test, progress)

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model = STFPM.build(cfg.backbone, cfg.teacher_weights, layers=layers, post=post).to(device)
    if cfg.feature_norm != "none":  # before anything reads the teacher: the cache and the student's targets see standardised levels
        model.teacher = FeatureNorm(model.teacher, *teacher_stats(model, train_imgs, cfg.batch_size), STANDARDISED_LEVELS[cfg.feature_norm])
    use_cache = cfg.cache_teacher and cfg.augment == "none" and cfg.reference == "student"
    cache_train = TeacherCache(model, train_imgs, cfg.batch_size, store, "train") if use_cache else None
    # validation images are never augmented; a memory bank has nothing to select
    cache_val = TeacherCache(model, val_imgs, cfg.batch_size, store, "val") if cfg.reference == "student" else None
    return Prepared(cfg, run_dir, dataset, geometry, splits, train_imgs, val_imgs, calib_imgs, model, cache_train, cache_val)


def _fit(p: Prepared, resume: bool, progress: bool) -> dict[str, Any]:
    """The epochs: the student learns, the best (or last) student is kept; resumable after every epoch."""
    from tqdm import tqdm

    cfg, model, run_dir = p.cfg, p.model, p.run_dir
    device = next(model.parameters()).device
    amp = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    optimizer = torch.optim.SGD(model.student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = lr_schedule(optimizer, cfg.lr_schedule, cfg.epochs)
    generator = torch.Generator().manual_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    start_epoch, best_loss, best_epoch, best_state, history = 0, float("inf"), -1, None, []
    if resume and (run_dir / LAST).is_file():
        state = torch.load(run_dir / LAST, map_location="cpu", weights_only=True)
        if state.get("config", {}).get("backbone") != cfg.backbone:
            raise StfpmError(f"{run_dir / LAST}: was trained with another backbone; cannot resume with {cfg.backbone}")
        model.student.load_state_dict({k: v.to(device) for k, v in state["student"].items()})
        optimizer.load_state_dict(state["optimizer"])
        if schedule is not None and state.get("schedule"):
            schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        start_epoch, best_loss, best_epoch = state["epoch"] + 1, state["best_loss"], state["best_epoch"]
        best_state, history = state["best_student"], state["history"]
        if progress:
            print(f"resuming {run_dir} at epoch {start_epoch + 1}/{cfg.epochs}")
    atomic_write_json(run_dir / "config.json", cfg.to_dict())

    bar = tqdm(range(start_epoch, cfg.epochs), desc="training", unit="epoch", disable=not progress, initial=start_epoch, total=cfg.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        losses = run_epoch(model, p.train_imgs, p.cache_train, optimizer, cfg, generator, amp, scaler)
        train_loss = losses["train_loss"]
        val_loss = validation_loss(model, p.val_imgs, p.cache_val, cfg.batch_size)
        if schedule is not None:
            schedule.step()
        if not all(np.isfinite(v) for v in losses.values()):
            raise StfpmError(f"training diverged at epoch {epoch + 1} (losses {losses}); lower --lr")
        record = {"epoch": epoch + 1, **losses, "val_loss": val_loss}
        if record["val_loss"] < best_loss or cfg.select == "last":
            best_loss, best_epoch = record["val_loss"], epoch
            best_state = {k: v.detach().clone() for k, v in model.student.state_dict().items()}
        history.append({**record, "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{record['val_loss']:.4f}", best=f"{best_loss:.4f}@{best_epoch + 1}")
        atomic_torch_save(run_dir / LAST, {
            "config": cfg.to_dict(), "epoch": epoch, "student": model.student.state_dict(),
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "schedule": schedule.state_dict() if schedule else None,
            "best_loss": best_loss, "best_epoch": best_epoch, "best_student": best_state, "history": history,
        })
    bar.close()
    model.student.load_state_dict(best_state)
    model.eval()
    epoch_seconds = [h["seconds"] for h in history]
    return {"epochs": cfg.epochs, "best_epoch": best_epoch + 1, "best_val_loss": best_loss, "history": history,
            "seconds_per_epoch": float(np.median(epoch_seconds)) if epoch_seconds else None}


POOL_PER_LEVEL = 500_000  # most candidate positions per level before the coreset: bounds memory and time


AUTO_POOL_BELOW_STRIDE = 16  # memory_pool auto: levels finer than this are searched at twice their stride


def memory_search(cfg: TrainConfig, strides: list[int]) -> tuple[MemorySearch, list[int]]:
    """The search options and the rows per level that ``cfg`` asks of a memory whose levels have these strides."""
    if cfg.memory_pool == "auto":
        # measured on screw (docs/results/memory-speed.md): stride 4 searched at 8 and 8 at 16 raise pixel AUROC and keep image AUROC, for 0.41 of the arithmetic
        pools = [2 if s < AUTO_POOL_BELOW_STRIDE else 1 for s in strides]
    else:
        pools = per_level(parse_counts("memory_pool", cfg.memory_pool), len(strides), 1)
    return MemorySearch(cfg.memory_aggregate, tuple(pools)), per_level(parse_counts("bank_size", cfg.bank_size), len(strides), 32768)


def memory_pools(model: STFPM, images: np.ndarray, search: MemorySearch, batch_size: int, generator: torch.Generator,
                 progress: bool = False) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """Per level, the candidate rows of a memory (CPU chunks, one per image, in the images' order): positions drawn evenly
    from every image, at most POOL_PER_LEVEL per level in all (memory stays bounded however many images there are); and
    every image's whole-part cells (``WholePart.describe`` of the deepest level, [images, cells, C]), from the same teacher pass."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    n = len(images)
    pools: list[list[torch.Tensor]] = [[] for _ in model.teacher.feature_info.reduction()]
    described = []
    model.eval()
    with torch.inference_mode():
        for idx in tqdm(_batches(n, batch_size, None), desc="teacher features", unit="batch", disable=not progress):
            feats = model.teacher(model.normalize(torch.from_numpy(images[idx.numpy()]).to(device)))
            described.append(WholePart.describe(feats[-1]).cpu())
            for k, f in enumerate(memory_rows(feats, search)):
                b, h, w, c = f.shape
                rows = f.reshape(b, h * w, c)
                keep = min(h * w, max(1, POOL_PER_LEVEL // n))
                for r in rows:
                    pick = torch.randperm(h * w, generator=generator)[:keep] if keep < h * w else slice(None)
                    pools[k].append(r[pick].cpu())
    return pools, torch.cat(described)


def _fit_memory(p: Prepared, progress: bool) -> dict[str, Any]:
    """``--reference memory``: the teacher's features of the good training images, a coreset per level.

    Positions (after the search's neighbourhood and pooling, ``model.memory_rows``) are drawn
    evenly from every image into a pool of at most POOL_PER_LEVEL per level (memory stays bounded
    however many images there are), then greedy k-centre keeps the level's ``bank_size`` rows that
    cover the pool. No epochs; the threshold and evaluation follow as usual.
    """
    from tqdm import tqdm

    cfg, model, run_dir = p.cfg, p.model, p.run_dir
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed)
    search, sizes = memory_search(cfg, list(model.teacher.feature_info.reduction()))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.to_dict())
    t0 = time.perf_counter()
    pools, described = memory_pools(model, p.train_imgs, search, cfg.batch_size, generator, progress)
    t_select = time.perf_counter()
    joined = [torch.cat(chunks).to(device) for chunks in pools]  # the selection runs where the teacher ran (seconds on a GPU)
    rows = [min(size, len(pool)) for size, pool in zip(sizes, joined)]
    with tqdm(total=sum(rows), desc=f"selecting {'+'.join(map(str, rows))} of {'+'.join(str(len(p)) for p in joined)} positions",
              unit="row", disable=not progress) as bar:
        chosen = coreset_levels(joined, rows, generator, bar.update)
        bar.update(sum(rows) - bar.n)
    select_seconds = time.perf_counter() - t_select
    banks, owners = [], []
    for chunks, pool, pick in zip(pools, joined, chosen):
        image_of_row = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor([len(c) for c in chunks]))
        banks.append(pool[pick.to(device)].cpu())
        owners.append(image_of_row[pick])
    # the whole-part term: every bank image's description; its offset and gain are set from good scores (calibrate_whole)
    whole = WholePart(described, len(banks) - 1) if cfg.whole_weight > 0 else None
    model.student = MemoryBank(banks, search, whole).to(device)
    model.eval()
    seconds = time.perf_counter() - t0
    return {"epochs": 0, "best_epoch": 0, "best_val_loss": None, "history": [], "seconds_per_epoch": None, "row_owners": owners,
            "memory": {"rows_per_level": [len(b) for b in banks], "pool_per_level": [sum(len(c) for c in ch) for ch in pools],
                       "search": search.to_dict(), "seconds": seconds, "coreset_seconds": select_seconds}}


# the share of good images' cells nearer to another good image's than the whole-part term's offset: beyond it the term speaks
WHOLE_OFFSET_QUANTILE = 0.99


def calibrate_whole(whole: WholePart, good_scores: np.ndarray, weight: float) -> None:
    """Set the whole-part term from good images only: ``offset`` = the WHOLE_OFFSET_QUANTILE of the bank images' cells'
    distances to the other bank images' (each image left out of its own comparison); ``gain`` = ``weight`` x the median good
    image score / the spread of those distances (their 99th percentile minus their median). Chosen on bottle, screw and
    transistor (docs/results/record.md "The whole part")."""
    d = whole.others_distances().flatten().cpu().double().numpy()
    spread = max(float(np.quantile(d, 0.99) - np.median(d)), 1e-6)
    whole.offset = float(np.quantile(d, WHOLE_OFFSET_QUANTILE))
    whole.gain = float(weight * np.median(good_scores) / spread)


# most bank images scored with their own rows left out (a seeded draw beyond): a tail fit needs hundreds of good scores, not
# thousands, and each costs a pass of the model (a 5,000-image class would otherwise wait minutes for its threshold)
OUT_OF_FOLD_IMAGES = 500


def own_rows_left_out_scores(model: STFPM, images: np.ndarray, owners: list[torch.Tensor], progress: bool = False,
                             limit: int = OUT_OF_FOLD_IMAGES, seed: int = 0) -> np.ndarray:
    """Bank images' scores against the memory with the rows each gave left out: out-of-fold scores of the images the
    memory was built from (``owners``: per level, the image of each bank row), for the threshold. At most ``limit``
    images, drawn with ``seed`` when there are more."""
    from tqdm import tqdm

    full = model.student
    banks = full.banks()
    chosen = range(len(images)) if len(images) <= limit else sorted(np.random.default_rng(seed).choice(len(images), limit, replace=False))
    scores = np.empty(len(chosen), dtype=np.float64)
    try:
        with torch.inference_mode():
            for k, i in enumerate(tqdm(chosen, desc="out-of-fold scores", unit="image", disable=not progress)):
                whole = full.whole
                if whole is not None:  # its own description left out too (row i: the bank's images in order)
                    whole = WholePart(torch.cat([whole.rows[:i], whole.rows[i + 1 :]]), whole.level, whole.offset, whole.gain)
                model.student = MemoryBank([b[o.to(b.device) != i] for b, o in zip(banks, owners)], full.search, whole)
                scores[k] = float(model(torch.from_numpy(images[i : i + 1]).to(banks[0].device))[1][0])
    finally:
        model.student = full
    return scores


def _finish(p: Prepared, training: dict[str, Any], progress: bool) -> tuple[Path, dict[str, Any]]:
    """Threshold from held-out good images, the self-contained checkpoint, evaluation and reports."""
    from .engines.torch_engine import TorchEngine

    cfg, model, run_dir, geometry, dataset = p.cfg, p.model, p.run_dir, p.geometry, p.dataset
    train_s, val_s, calib_s = p.splits
    infer = TorchEngine.from_model(model, {"geometry": geometry.to_dict()}).infer
    whole = model.student.whole if isinstance(model.student, MemoryBank) else None
    if whole is not None:  # its offset and gain, from the held-out good images' map scores (the term is silent until set)
        held_out = np.concatenate([p.calib_imgs, p.val_imgs]) if calib_s else p.calib_imgs  # (no calibration split: calib_imgs is validation's)
        calibrate_whole(whole, predict(infer, held_out)[1], cfg.whole_weight)
    # out-of-fold good scores: images the reference did not learn. A student: its calibration and validation splits (the
    # validation split chose the epoch by loss, not by score); a memory: both splits, and every bank image scored with its
    # own rows left out of the search
    held_maps, held_scores = predict(infer, p.calib_imgs)
    parts = [("calibration" if calib_s else "validation", len(p.calib_imgs))]  # in the order of the scores
    if calib_s:
        more_maps, more_scores = predict(infer, p.val_imgs)
        held_maps, held_scores = np.concatenate([held_maps, more_maps]), np.concatenate([held_scores, more_scores])
        parts.append(("validation", len(p.val_imgs)))
    good_scores = held_scores
    if cfg.reference == "memory" and training.get("row_owners") is not None:
        own = own_rows_left_out_scores(model, p.train_imgs, training["row_owners"], progress, seed=cfg.seed)
        good_scores = np.concatenate([held_scores, own])
        parts.append(("bank images, own rows left out", len(own)))
    training = {k: v for k, v in training.items() if k != "row_owners"}
    threshold_entry = fit_threshold(good_scores, cfg.false_call_rate, cfg.threshold_rule, cfg.seed)
    threshold_entry["sources"] = " + ".join(f"{n} {name}" for name, n in parts)
    if "warning" in threshold_entry and progress:
        print(f"warning: {threshold_entry['warning']}")
    threshold = threshold_entry["image"]
    meta: dict[str, Any] = {
        "backbone": cfg.backbone,
        "layers": list(model.teacher.feature_info.out_indices),
        "map_post": model.post.to_dict(),
        "feature_norm": cfg.feature_norm,
        **({"memory_search": model.student.search.to_dict()} if cfg.reference == "memory" else {}),
        **({"memory_whole": whole.to_dict()} if whole is not None else {}),
        "geometry": geometry.to_dict(),
        "input": {"dtype": "uint8", "layout": "NHWC", "colour_order": "BGR"},
        "normalization": {"colour_order": "RGB", "mean": list(spec(cfg.backbone).mean), "std": list(spec(cfg.backbone).std)},
        "threshold": threshold_entry,
        "normal_stats": {"image_scores": normal_statistics(good_scores), "pixel_max": float(held_maps.max()),
                         "heldout_scores": [float(v) for v in good_scores], "heldout_sources": [[name, n] for name, n in parts],
                         # what a run compares its good frames with (stfpm_edge.drift): every good image of training, its out-of-fold scores
                         "drift": reference_of([*p.train_imgs, *p.val_imgs, *(p.calib_imgs if calib_s else [])], good_scores)},
        "config": cfg.to_dict(),
        "dataset": {"name": dataset.name, "layout": dataset.layout, "root": str(dataset.root), "n_train": len(train_s),
                    "n_val": len(val_s), "n_calib": len(calib_s), "n_test": len(dataset.test)},
        "training": training,
        "tool_version": __version__,
    }
    save_checkpoint(run_dir / MODEL, model, meta)

    result = evaluate(TorchEngine.from_model(model, meta).infer, dataset.test, geometry, threshold, progress=progress)
    record = write_outputs(result, run_dir, geometry, threshold, dataset, cfg.overlays, extra={
        "backbone": cfg.backbone, "reference": cfg.reference, "epochs": training["epochs"], "best_epoch": training["best_epoch"],
        "seconds_per_epoch": training["seconds_per_epoch"], "model": str(run_dir / MODEL),
        **({"memory": training["memory"]} if "memory" in training else {}),
        "threshold_rule": {k: v for k, v in threshold_entry.items() if k != "image"}}, target_rate=cfg.false_call_rate)
    meta["metrics"] = {k: v for k, v in result.metrics.items()}
    save_checkpoint(run_dir / MODEL, model, meta)  # now with the metrics it earned
    (run_dir / LAST).unlink(missing_ok=True)  # finished: the checkpoint supersedes the resume state
    record["model_sha256"] = sha256_file(run_dir / MODEL)
    atomic_write_json(run_dir / "metrics.json", record)
    return run_dir, record


def add_good_images(checkpoint: Path, folders: list[Path], out: Path, progress: bool = True) -> dict[str, Any]:
    """A memory model that knows more good images, in seconds: their teacher features join the bank (every position, after
    the model's own search pooling) and the threshold is set again by the model's own rule and false-call rate, from its
    stored out-of-fold good scores plus these images' scores against the memory before they joined it (out-of-fold too).
    A history entry records when, which images, and the old and new threshold. Returns that entry. A student is refused:
    its good images are learned by training."""
    from .datasets import Sample, list_images, load_images
    from .engines.torch_engine import TorchEngine

    model, meta = load_checkpoint(checkpoint)
    if not isinstance(model.student, MemoryBank):
        raise StfpmError(f"{checkpoint}: a student model learns good images by training, not by adding them; put the images with the "
                         "training set's good ones and train again: stfpm-edge train --data DIR --reference student")
    paths = [p for folder in folders for p in list_images(Path(folder))]
    if not paths:
        raise StfpmError(f"no images in {', '.join(map(str, folders))}: nothing to add")
    t0 = time.perf_counter()
    geometry = Geometry(**meta["geometry"])
    images, _ = load_images([Sample(p, 0) for p in paths], geometry, progress, "good images")
    _, before = predict(TorchEngine.from_model(model, meta).infer, images)  # out-of-fold: they are not in the memory yet
    search, whole = model.student.search, model.student.whole
    added = [[] for _ in model.student.banks()]
    described = []
    with torch.inference_mode():
        for i in range(0, len(images), 16):
            feats = model.teacher(model.normalize(torch.from_numpy(images[i : i + 16])))
            described.append(WholePart.describe(feats[-1]))
            for k, rows in enumerate(memory_rows(feats, search)):
                added[k].append(rows.reshape(-1, rows.shape[-1]))
    if whole is not None:  # their layouts join the whole-part term's good images (its offset and gain stay)
        whole = WholePart(torch.cat([whole.rows, *described]), whole.level, whole.offset, whole.gain)
        meta["memory_whole"] = whole.to_dict()
    model.student = MemoryBank([torch.cat([bank, *rows]) for bank, rows in zip(model.student.banks(), added)], search, whole)
    old = meta["threshold"]
    stats = meta.get("normal_stats") or {}
    good = np.concatenate([np.asarray(stats.get("heldout_scores") or [], dtype=np.float64), before.astype(np.float64)])
    entry = refit_threshold(meta, good, sources=f"{old.get('sources', 'the good images of training')} + {len(paths)} added good images")
    event = {"time": datetime.now().isoformat(timespec="seconds"), "added_good_images": len(paths), "folders": [str(f) for f in folders],
             "old_threshold": old.get("image"), "new_threshold": entry["image"], "scores_before": [float(v) for v in before],
             "rows_added_per_level": [int(sum(len(r) for r in rows)) for rows in added]}
    meta["threshold"] = entry
    meta["normal_stats"] = {**stats, "heldout_scores": [float(v) for v in good], "image_scores": normal_statistics(good),
                            "heldout_sources": [*stats.get("heldout_sources", []), ["added good images", len(paths)]]}
    meta["memory_rows"] = [len(b) for b in model.student.banks()]
    meta["updates"] = [*meta.get("updates", []), event]
    meta.pop("metrics", None)  # earned by the model before: evaluate the new one (stfpm-edge eval)
    save_checkpoint(out, model, meta)
    event["seconds"] = time.perf_counter() - t0
    return event
