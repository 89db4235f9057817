"""Epoch time with the teacher-feature cache versus recomputing the frozen teacher every batch.

Both variants run the library's own ``run_epoch`` on the same images, interleaved (cached,
uncached, cached, ...) so a noisy machine affects both alike. Prints one JSON record.

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
from stfpm_edge.train import TeacherCache, run_epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per variant")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    args = ap.parse_args()

    cfg = TrainConfig(data=args.data, backbone=args.backbone, height=args.size, width=args.size, batch_size=args.batch_size)
    ds = discover(args.data)
    train_s, _ = split_train_val(ds.train, cfg.val_fraction, cfg.seed)
    images, _ = load_images(train_s, Geometry(args.size, args.size))
    torch.manual_seed(0)
    model = STFPM.build(args.backbone)
    opt = torch.optim.SGD(model.student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)

    t0 = time.perf_counter()
    cache = TeacherCache(model, images, args.batch_size)
    build_s = time.perf_counter() - t0
    run_epoch(model, images, cache, opt, cfg, gen)  # warm-up
    times = {"cached": [], "recomputed": []}
    for _ in range(args.epochs):
        for name, c in (("cached", cache), ("recomputed", None)):
            t0 = time.perf_counter()
            run_epoch(model, images, c, opt, cfg, gen)
            times[name].append(time.perf_counter() - t0)
    cached, recomputed = float(np.median(times["cached"])), float(np.median(times["recomputed"]))
    print(json.dumps({
        "images": len(images), "size": args.size, "batch_size": args.batch_size, "backbone": args.backbone,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cache_build_s": round(build_s, 2),
        "epoch_s_cached_median": round(cached, 2), "epoch_s_recomputed_median": round(recomputed, 2),
        "speedup": round(recomputed / cached, 3), "raw_s": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
