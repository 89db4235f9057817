"""Epoch time with the teacher-feature cache, recomputing the frozen teacher every batch, and with
rotation augmentation (which needs the teacher on every augmented batch: the price of ``--augment``).

The variants run the library's own ``run_epoch`` on the same images, interleaved (cached,
uncached, rotate, cached, ...) so a noisy machine affects all alike. Prints one JSON record.

    python benchmarks/teacher_cache.py --data ../shared/data/mvtec/bottle --epochs 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from stfpm_edge.config import TrainConfig
from stfpm_edge.datasets import discover, load_images, split_train_val
from stfpm_edge.geometry import Geometry
from stfpm_edge.model import STFPM
from stfpm_edge.store import TrainingStore
from stfpm_edge.train import TeacherCache, run_epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per variant")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    args = ap.parse_args()

    cfg = TrainConfig(data=args.data, backbone=args.backbone, height=args.size, width=args.size, batch_size=args.batch_size, augment="none")
    rotated = TrainConfig(**{**cfg.to_dict(), "augment": "rotate"})
    ds = discover(args.data)
    train_s, _ = split_train_val(ds.train, cfg.val_fraction, cfg.seed)
    images, _ = load_images(train_s, Geometry(args.size, args.size))
    torch.manual_seed(0)
    model = STFPM.build(args.backbone)
    opt = torch.optim.SGD(model.student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)

    store = TrainingStore()
    t0 = time.perf_counter()
    cache = TeacherCache(model, images, args.batch_size, store, "train")
    build_s = time.perf_counter() - t0
    run_epoch(model, images, cache, opt, cfg, gen)  # warm-up
    times = {"cached": [], "recomputed": [], "rotate": []}
    variants = (("cached", cache, cfg), ("recomputed", None, cfg), ("rotate", None, rotated))  # rotate: teacher every step
    for _ in range(args.epochs):
        for name, c, conf in variants:
            t0 = time.perf_counter()
            run_epoch(model, images, c, opt, conf, gen)
            times[name].append(time.perf_counter() - t0)
    store.close()
    cached, recomputed = float(np.median(times["cached"])), float(np.median(times["recomputed"]))
    rotate = float(np.median(times["rotate"]))
    print(json.dumps({
        "images": len(images), "size": args.size, "batch_size": args.batch_size, "backbone": args.backbone,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cache_build_s": round(build_s, 2),
        "epoch_s_cached_median": round(cached, 2), "epoch_s_recomputed_median": round(recomputed, 2),
        "epoch_s_rotate_median": round(rotate, 2), "rotate_cost_vs_cached": round(rotate / cached, 3),
        "speedup": round(recomputed / cached, 3), "raw_s": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
