"""Training harness: data, the student's optimisation, best-validation checkpoint, threshold, evaluation."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .backbones import spec
from .checkpoint import atomic_torch_save, save_checkpoint
from .config import TrainConfig
from .data import Geometry, discover, load_images, split_train_val
from .errors import StfpmError
from .evaluate import evaluate, predict, write_outputs
from .fileio import atomic_write_json, sha256_file
from .model import STFPM, stfpm_loss
from .thresholds import normal_statistics, threshold_from_normal

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
    """The frozen teacher's features for a fixed set of images, computed once (no augmentation)."""

    def __init__(self, model: STFPM, images: np.ndarray, batch_size: int):
        levels: list[list[torch.Tensor]] = []
        device = next(model.parameters()).device
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                x = model.normalize(torch.from_numpy(images[i : i + batch_size]).to(device))
                levels.append(model.teacher(x))
        self.levels = [torch.cat([b[k] for b in levels]) for k in range(len(levels[0]))] if levels else []

    def __getitem__(self, idx: torch.Tensor) -> list[torch.Tensor]:
        return [lvl[idx] for lvl in self.levels]


def _batches(n: int, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # random horizontal and vertical flips per image
    n = x.shape[0]
    h = torch.rand(n, generator=generator) < 0.5
    v = torch.rand(n, generator=generator) < 0.5
    x = torch.where(h.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    return torch.where(v.view(-1, 1, 1, 1).to(x.device), x.flip(2), x)


def run_epoch(model: STFPM, images: np.ndarray, cache: TeacherCache | None, optimizer, cfg: TrainConfig, generator: torch.Generator) -> float:
    """One pass of the student over the training images; returns the mean batch loss."""
    model.train()
    device = next(model.parameters()).device
    losses = []
    for idx in _batches(len(images), cfg.batch_size, generator):
        x = model.normalize(torch.from_numpy(images[idx.numpy()]).to(device))
        if cfg.augment:
            x = _augment(x, generator)
        if cache is not None:
            t = cache[idx]
        else:
            with torch.no_grad():
                t = model.teacher(x)
        loss = stfpm_loss(t, model.student(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def validation_loss(model: STFPM, images: np.ndarray, cache: TeacherCache | None, batch_size: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for idx in _batches(len(images), batch_size, None):
            x = model.normalize(torch.from_numpy(images[idx.numpy()]).to(device))
            t = cache[idx] if cache is not None else model.teacher(x)
            total += float(stfpm_loss(t, model.student(x))) * len(idx)
            count += len(idx)
    return total / count


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train, keep the best-validation student, set the threshold, evaluate; returns (run dir, metrics)."""
    from tqdm import tqdm

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    geometry = Geometry(cfg.height, cfg.width, cfg.resize)
    dataset = discover(cfg.data, seed=cfg.seed)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg, dataset.name)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise StfpmError(f"{run_dir}: run folder exists and is not empty; pass --resume to continue it or choose another --out")
    if resume and not (run_dir / LAST).is_file() and (run_dir / MODEL).is_file():
        raise StfpmError(f"{run_dir}: nothing to resume, this run finished ({MODEL} is there); choose another --out to train again")
    train_s, val_s = split_train_val(dataset.train, cfg.val_fraction, cfg.seed)
    # decode everything up front: a bad file fails here, before anything is written
    train_imgs, _ = load_images(train_s, geometry, progress=progress, desc="train images")
    val_imgs, _ = load_images(val_s, geometry, progress=progress, desc="validation images")

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model = STFPM.build(cfg.backbone, cfg.teacher_weights).to(device)
    optimizer = torch.optim.SGD(model.student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    use_cache = cfg.cache_teacher and not cfg.augment
    cache_train = TeacherCache(model, train_imgs, cfg.batch_size) if use_cache else None
    cache_val = TeacherCache(model, val_imgs, cfg.batch_size)  # validation images are never augmented

    run_dir.mkdir(parents=True, exist_ok=True)
    start_epoch, best_loss, best_epoch, best_state, history = 0, float("inf"), -1, None, []
    if resume and (run_dir / LAST).is_file():
        state = torch.load(run_dir / LAST, map_location="cpu", weights_only=True)
        if state.get("config", {}).get("backbone") != cfg.backbone:
            raise StfpmError(f"{run_dir / LAST}: was trained with another backbone; cannot resume with {cfg.backbone}")
        model.student.load_state_dict({k: v.to(device) for k, v in state["student"].items()})
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start_epoch, best_loss, best_epoch = state["epoch"] + 1, state["best_loss"], state["best_epoch"]
        best_state, history = state["best_student"], state["history"]
        if progress:
            print(f"resuming {run_dir} at epoch {start_epoch + 1}/{cfg.epochs}")
    atomic_write_json(run_dir / "config.json", cfg.to_dict())

    bar = tqdm(range(start_epoch, cfg.epochs), desc="training", unit="epoch", disable=not progress, initial=start_epoch, total=cfg.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        train_loss = run_epoch(model, train_imgs, cache_train, optimizer, cfg, generator)
        val_loss = validation_loss(model, val_imgs, cache_val, cfg.batch_size)
        if not np.isfinite(train_loss):
            raise StfpmError(f"training diverged at epoch {epoch + 1} (loss {train_loss}); lower --lr")
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.student.state_dict().items()}
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=f"{best_loss:.4f}@{best_epoch + 1}")
        atomic_torch_save(run_dir / LAST, {
            "config": cfg.to_dict(), "epoch": epoch, "student": model.student.state_dict(),
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "best_loss": best_loss, "best_epoch": best_epoch, "best_student": best_state, "history": history,
        })
    bar.close()

    model.student.load_state_dict(best_state)
    model.eval()
    from .engines.torch_engine import TorchEngine

    val_maps, val_scores = predict(TorchEngine.from_model(model, {"geometry": geometry.to_dict()}).infer, val_imgs)
    threshold = threshold_from_normal(val_scores, cfg.threshold_quantile)
    epoch_seconds = [h["seconds"] for h in history]
    meta: dict[str, Any] = {
        "backbone": cfg.backbone,
        "geometry": geometry.to_dict(),
        "input": {"dtype": "uint8", "layout": "NHWC", "colour_order": "BGR"},
        "normalization": {"colour_order": "RGB", "mean": list(spec(cfg.backbone).mean), "std": list(spec(cfg.backbone).std)},
        "threshold": {"image": threshold, "rule": f"quantile {cfg.threshold_quantile} of held-out good image scores", "quantile": cfg.threshold_quantile},
        "normal_stats": {"image_scores": normal_statistics(val_scores), "pixel_max": float(val_maps.max())},
        "config": cfg.to_dict(),
        "dataset": {"name": dataset.name, "layout": dataset.layout, "root": str(dataset.root), "n_train": len(train_s), "n_val": len(val_s), "n_test": len(dataset.test)},
        "training": {"epochs": cfg.epochs, "best_epoch": best_epoch + 1, "best_val_loss": best_loss, "history": history,
                      "seconds_per_epoch": float(np.median(epoch_seconds)) if epoch_seconds else None},
        "tool_version": __version__,
    }
    save_checkpoint(run_dir / MODEL, model, meta)

    result = evaluate(TorchEngine.from_model(model, meta).infer, dataset.test, geometry, threshold, progress=progress)
    record = write_outputs(result, run_dir, geometry, threshold, dataset, cfg.overlays, extra={
        "backbone": cfg.backbone, "epochs": cfg.epochs, "best_epoch": best_epoch + 1,
        "seconds_per_epoch": meta["training"]["seconds_per_epoch"], "model": str(run_dir / MODEL)})
    meta["metrics"] = {k: v for k, v in result.metrics.items()}
    save_checkpoint(run_dir / MODEL, model, meta)  # now with the metrics it earned
    (run_dir / LAST).unlink(missing_ok=True)  # finished: the checkpoint supersedes the resume state
    record["model_sha256"] = sha256_file(run_dir / MODEL)
    atomic_write_json(run_dir / "metrics.json", record)
    return run_dir, record

