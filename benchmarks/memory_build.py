"""How long the memory reference takes to build, and whether the fast selection selects what the plain one did.

    python benchmarks/memory_build.py --data ../shared/data/mvtec/bottle --threads 2
    python benchmarks/memory_build.py --data ../shared/data/mvtec/screw --copies 761 --threads 2   # a 761-image class
    python benchmarks/memory_build.py --curve 250 1000 5000 --threads 2                          # time and peak memory

The candidate pools are built once, exactly as ``stfpm-edge train`` builds them (``train.memory_pools``:
the teacher's pass, the default search, 80 % of the good images). Then, per level, the plain greedy
k-centre selection (the algorithm before ``model.greedy_coreset`` became lazy: one pass over the
whole pool per chosen row, kept here as the baseline) and ``model.greedy_coreset`` run on the same
pool from the same first row (the plain one level after another, as training did; the lazy one
through ``model.coreset_levels``, levels side by side), interleaved plain / lazy / lazy / plain
(``--rounds`` pairs), so drift hits both alike. Printed: seconds for each, the share of rows both chose, and the
covering radius each reached (the largest distance from a pool row to its nearest chosen row,
the quantity greedy k-centre bounds).

``--copies N``: the training images repeated with flips and quarter turns until there are N good
images (80 % of them feed the bank, as in training), a stand-in for a large class.
``--curve``: for each count, a generated set of that many 256x256 good images trained with
``stfpm-edge train`` defaults in a fresh process; prints the build's seconds and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def plain_greedy(x: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """The selection before the lazy one, from row ``first``: every chosen row is compared with the whole pool (the
    baseline; what ``model.greedy_coreset`` still does on a GPU)."""
    chosen = [first]
    nearest = 2.0 - 2.0 * (x @ x[first])
    for _ in range(1, k):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, 2.0 - 2.0 * (x @ x[chosen[-1]]))
    return torch.tensor(chosen, dtype=torch.long)


def covering_radius(pool: torch.Tensor, chosen: torch.Tensor) -> float:
    """The largest Euclidean distance from a pool row to its nearest chosen row (unit rows)."""
    centres = pool[chosen]
    worst = 0.0
    for a in range(0, len(pool), 8192):
        sims = (pool[a : a + 8192] @ centres.T).amax(dim=1)
        worst = max(worst, float((2.0 - 2.0 * sims).clamp_min(0).max()))
    return worst**0.5


def build_pools(data: str, copies: int, seed: int):
    from stfpm_edge.config import load_config
    from stfpm_edge.datasets import discover, heldout_splits, load_images
    from stfpm_edge.geometry import Geometry
    from stfpm_edge.model import STFPM, MapPost
    from stfpm_edge.train import memory_pools, memory_search

    cfg = load_config(None, {"data": data, "seed": seed, "height": 256, "width": 256})  # MVTec's square images: the automatic size
    dataset = discover(cfg.data, seed=cfg.seed)
    good = dataset.train
    images, _ = load_images(good, Geometry(cfg.height, cfg.width, cfg.resize), progress=False)
    if copies > len(images):  # flips and quarter turns of the originals, in turn, up to ``copies`` images
        variants = [lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: np.rot90(a, 1), lambda a: np.rot90(a, 3),
                    lambda a: np.rot90(a, 2), lambda a: np.rot90(a[:, ::-1], 1), lambda a: np.rot90(a[:, ::-1], 3)]
        extra = [np.ascontiguousarray(variants[(i // len(images)) % len(variants)](images[i % len(images)])) for i in range(copies - len(images))]
        images = np.concatenate([images, np.stack(extra)])
        splits = heldout_splits([None] * len(images), cfg.val_fraction, cfg.calib_fraction, cfg.seed)  # type: ignore[list-item]
        n_train = len(splits[0])
        images = images[np.random.default_rng(seed).permutation(len(images))[:n_train]]
    else:
        train, _, _ = heldout_splits(good, cfg.val_fraction, cfg.calib_fraction, cfg.seed)
        images, _ = load_images(train, Geometry(cfg.height, cfg.width, cfg.resize), progress=False)
    model = STFPM.build(cfg.backbone, post=MapPost())
    search, sizes = memory_search(cfg, list(model.teacher.feature_info.reduction()))
    t0 = time.perf_counter()
    pools, _ = memory_pools(model, images, search, cfg.batch_size, torch.Generator().manual_seed(seed))
    return [torch.cat(p) for p in pools], sizes, len(images), time.perf_counter() - t0


def compare(args) -> None:
    from stfpm_edge.model import coreset_levels

    torch.set_num_threads(args.threads)
    pools, sizes, n_images, teacher_s = build_pools(args.data, args.copies, args.seed)
    sizes = [min(s, len(p)) for s, p in zip(sizes, pools)]
    print(f"{args.data}: {n_images} bank images, teacher pass and pools {teacher_s:.1f} s; pools {[len(p) for p in pools]}, "
          f"banks {sizes} rows; {args.threads} threads")
    gen = torch.Generator().manual_seed(args.seed)  # the first row of each level as coreset_levels draws it: both start there
    firsts = [int(torch.randint(len(p), (1,), generator=gen)) for p in pools]
    times: dict[str, list] = {"plain": [], "lazy": []}
    plain_levels: list[float] = []
    picks: dict[str, list] = {}
    for name in (["plain", "lazy", "lazy", "plain"] * args.rounds)[: 2 * args.rounds]:
        t = time.perf_counter()
        if name == "plain":  # one level after another, as train did
            picks[name], plain_levels = [], []
            for pool, size, first in zip(pools, sizes, firsts):
                t_level = time.perf_counter()
                picks[name].append(plain_greedy(pool, size, first))
                plain_levels.append(time.perf_counter() - t_level)
        else:
            picks[name] = coreset_levels(pools, sizes, torch.Generator().manual_seed(args.seed))
        times[name].append(time.perf_counter() - t)
    rows = []
    for level, (pool, size) in enumerate(zip(pools, sizes)):
        same = len(set(picks["plain"][level].tolist()) & set(picks["lazy"][level].tolist())) / size
        radius = {name: covering_radius(pool, picks[name][level]) for name in picks}
        rows.append({"level": level, "pool": len(pool), "rows": size, "plain_s": plain_levels[level], "same_rows": same,
                     "radius_plain": radius["plain"], "radius_lazy": radius["lazy"]})
        print(f"level {level}: {size} of {len(pool)} rows: plain {plain_levels[level]:.1f} s; same rows {same:.4f}; "
              f"covering radius {radius['plain']:.4f} plain / {radius['lazy']:.4f} lazy")
    plain, lazy = min(times["plain"]), min(times["lazy"])
    print(f"selection: plain {plain:.1f} s (levels one after another), lazy {lazy:.1f} s (levels side by side) = {plain / lazy:.1f}x; "
          f"build with the teacher pass: plain {plain + teacher_s:.1f} s, lazy {lazy + teacher_s:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": args.data, "copies": args.copies, "threads": args.threads, "bank_images": n_images,
                                               "teacher_s": teacher_s, "plain_s": plain, "lazy_s": lazy, "levels": rows}, indent=1))


CHILD = """
import json, resource, sys, torch
from stfpm_edge.config import load_config
from stfpm_edge.train import train
torch.set_num_threads({threads})
cfg = load_config(None, dict(data={data!r}, out={out!r}, overlays=0))
_, m = train(cfg, progress=False)
print(json.dumps({{"build_s": m["memory"]["seconds"], "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def curve(args) -> None:
    from stfpm_edge.synthetic import make_mvtec_like

    for count in args.curve:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            make_mvtec_like(data, n_train=count, n_test_good=4, n_test_defect=4, height=256, width=256, seed=args.seed)
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD.format(threads=args.threads, data=str(data), out=str(Path(tmp) / "run"))],
                                 capture_output=True, text=True, check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{count} good images ({int(count * 0.8)} in the bank): build {m['build_s']:.1f} s, whole training run "
                  f"{time.perf_counter() - t:.0f} s, peak RSS {m['peak_mb']:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a data set folder (MVTec or folder layout)")
    ap.add_argument("--copies", type=int, default=0, help="repeat the good images with flips and turns up to this many")
    ap.add_argument("--curve", type=int, nargs="*", help="generated sets of these many good images: build time and peak RSS")
    ap.add_argument("--rounds", type=int, default=1, help="plain/lazy pairs per level (interleaved)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the comparison here")
    args = ap.parse_args()
    if args.curve:
        torch.set_num_threads(args.threads)
        curve(args)
    elif args.data:
        compare(args)
    else:
        ap.error("give --data DIR or --curve N [N ...]")


if __name__ == "__main__":
    main()
