"""Where two maps' pixel AUROCs part: per defect type, against which good pixels, near or far from a defect (issue 17).

    python benchmarks/map_gap.py RUN1/model.pt RUN2/model.pt ... --data ../shared/data/mvtec/bottle [--rings 8,16,32] [--weights "1,1,1;0,0,1"] [--threads 1]

The protocol's pixel AUROC ranks every pixel of the labelled test images (good images included)
in one pool. Two maps with different figures can differ in very different places: on the good
pixels of good images (the map lights up on normal variation), on the good pixels of defective
images just around a defect (a coarse or blurred map spills over the defect's edge), or inside the
defects of one type (the map misses some of what it should find). For each checkpoint this prints,
on the test images of ``--data`` with the checkpoint's own map (nothing retrained or re-read):

- ``all``: the protocol's pixel AUROC (equals the run's metrics.json);
- ``vs good images``: defect pixels against the pixels of good images only;
- ``vs defect images``: defect pixels against the good pixels of the defective images only;
- ``far R``: as ``vs defect images`` without the good pixels within R model pixels of a defect, for
  each R of ``--rings`` (8 is the smoothing's 2 sigma, 16 a stride-16 cell), so ``far R`` minus
  ``vs defect images`` is what the map's spill over a defect's edge costs up to R pixels out;
- per defect type: its defect pixels against every good pixel of the test images (the pool of ``all``).

``--weights`` reads each checkpoint again with other level weights (``MapPost.level_weights``, the
exponents of the levels' product; ``;`` between sets, the checkpoint's smoothing kept): which levels
make or spoil the map near defects, nothing retrained.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)], np.r_[pos, neg]))


def readings(maps: np.ndarray, masks: np.ndarray, valid: np.ndarray, defects: list[str], rings: list[int]) -> dict[str, float]:
    """The AUROCs above for maps [N,H,W], ground-truth masks [N,H,W] and content pixels ``valid`` of labelled images."""
    from scipy import ndimage

    masks = masks.astype(bool)
    is_bad = masks.reshape(len(masks), -1).any(axis=1)
    pos = maps[masks & valid]
    good = ~masks & valid
    out = {
        "all": auroc(pos, maps[good]),
        "vs good images": auroc(pos, maps[~is_bad][good[~is_bad]]),
        "vs defect images": auroc(pos, maps[is_bad][good[is_bad]]),
    }
    for ring in rings:
        near = np.stack([ndimage.binary_dilation(m, iterations=ring) if ring > 0 else m for m in masks[is_bad]])
        out[f"far {ring}"] = auroc(pos, maps[is_bad][good[is_bad] & ~near])
    kinds = np.array(defects)
    for kind in sorted(set(defects) - {"good"}):
        sel = kinds == kind
        out[kind] = auroc(maps[sel][(masks & valid)[sel]], maps[good])
    return out


def main() -> None:
    import torch

    from stfpm_edge.checkpoint import load_checkpoint
    from stfpm_edge.datasets import discover
    from stfpm_edge.engines.torch_engine import TorchEngine
    from stfpm_edge.evaluate import TestSet, predict
    from stfpm_edge.metrics import pixel_pairs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", type=Path, nargs="+", help="model.pt of trained runs on the category of --data")
    ap.add_argument("--data", type=Path, required=True, help="the category folder (MVTec layout, with ground-truth masks)")
    ap.add_argument("--rings", default="8,16,32", help="model pixels around a defect left out of each 'far' reading [default: 8,16,32]")
    ap.add_argument("--weights", default="", help="other level-weight sets to read each checkpoint with, ';' between sets (e.g. '1,1,1;0,0,1')")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rings = [int(r) for r in args.rings.split(",") if r.strip()]
    samples = discover(args.data, seed=0).test
    rows, test = [], None
    weight_sets = [tuple(float(w) for w in ws.split(",")) for ws in args.weights.split(";") if ws.strip()]
    for path in args.checkpoints:
        model, meta = load_checkpoint(path)
        engine = TorchEngine.from_model(model, meta)
        if test is None or test.images.shape[1:3] != (engine.geometry.height, engine.geometry.width):
            test = TestSet.load(samples, engine.geometry, False)
        defects = [s.defect for s, keep in zip(samples, test.has_mask) if keep]
        own = model.post
        for weights in [None, *weight_sets]:
            label = path.parent.name
            if weights is not None:
                model.set_post(dataclasses.replace(own, level_weights=weights))
                label += " weights " + ",".join(f"{w:g}" for w in weights)
            maps, _ = predict(engine.infer, test.images)
            _, _, (labelled, masks, valid) = pixel_pairs(maps, test.masks, test.has_mask, test.valid)  # the protocol's pixel selection
            rows.append((label, readings(labelled, masks, valid, defects, rings)))
    names = list(rows[0][1])
    print("| run | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for run, r in rows:
        print(f"| {run} | " + " | ".join(f"{r[n]:.4f}" for n in names) + " |", flush=True)


if __name__ == "__main__":
    main()
