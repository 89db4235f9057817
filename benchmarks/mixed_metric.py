"""A standardised student read with another distance per level, nothing retrained (issue 17).

    python benchmarks/mixed_metric.py RUN/model.pt --data ../shared/data/mvtec/bottle [--threads 1]

The default student compares standardised teacher and student features by the mean squared
difference at every level. Standardisation is a per-channel affine map of the teacher's features
(``FeatureNorm``), so a standardised student's features can be mapped back into the teacher's raw
feature space and compared there by the paper's cosine. Printed per reading, on the test images of
``--data``: image AUROC (the checkpoint's own image score) and pixel AUROC, with the checkpoint's
level weights, smoothing and score rule:

- ``l2 at every level``: the deployed map (a check: it must equal the run's metrics.json);
- ``cosine finer, l2 deepest``: the finer levels by the cosine of the raw features (the paper's
  distance, which gave bottle its best pixel AUROC), the deepest standardised (screw's image score);
- ``cosine at every level``: the paper's distance throughout, on the raw features;
- ``cosine of standardised finer, l2 deepest``: the cosine on the standardised features themselves.

It answers whether a mixed per-level feature normalisation is worth training: if the mixed reading
does not beat the deployed one on a student trained with every level standardised, the raw finer
levels carry no better pixel ranking to train for.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

READINGS = {
    "l2 at every level": "l2",
    "cosine finer, l2 deepest": "raw-cosine",
    "cosine at every level": "raw-cosine-all",
    "cosine of standardised finer, l2 deepest": "std-cosine",
}


def level_distances(model, t, s, reading: str) -> list[torch.Tensor]:
    """Per level, the distance of ``reading`` between standardised teacher ``t`` and student ``s`` features."""
    from stfpm_edge.model import feature_distance, squared_distance

    norm = model.teacher
    deepest = len(t) - 1
    out = []
    for k, (a, b) in enumerate(zip(t, s)):
        if reading == "l2" or (k == deepest and reading != "raw-cosine-all"):
            out.append(squared_distance(a, b))
        elif reading == "std-cosine":
            out.append(feature_distance(a, b))
        else:  # back into the teacher's raw feature space: f = standardised / inv_std + mean
            scale, shift = getattr(norm, f"inv_std{k}"), getattr(norm, f"mean{k}")
            out.append(feature_distance(a / scale + shift, b / scale + shift))
    return out


def main() -> None:
    from sklearn.metrics import roc_auc_score

    from stfpm_edge.checkpoint import load_checkpoint
    from stfpm_edge.datasets import discover
    from stfpm_edge.evaluate import TestSet
    from stfpm_edge.geometry import Geometry
    from stfpm_edge.model import FeatureNorm, blur_map, combine_levels, gaussian_kernel, image_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="a student trained with --feature-norm channel (the default student)")
    ap.add_argument("--data", type=Path, required=True, help="the MVTec category folder it was trained on")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint)
    if not isinstance(model.teacher, FeatureNorm) or len(model.teacher.standardised) != len(model.metric):
        raise SystemExit(f"{args.checkpoint}: not a student standardised at every level (--feature-norm channel); nothing to map back")
    model.eval()
    g = meta["geometry"]
    geo = Geometry(g["height"], g["width"], g["resize"])
    test = TestSet.load(discover(args.data, seed=0).test, geo, False)
    post = model.post
    kernel = gaussian_kernel(post.blur_sigma) if post.blur_sigma > 0 else None
    maps: dict[str, list[np.ndarray]] = {name: [] for name in READINGS}
    with torch.inference_mode():
        for i in range(0, len(test.images), 8):
            t, s = model.features(model.normalize(torch.from_numpy(test.images[i : i + 8])))
            for name, reading in READINGS.items():
                amap = combine_levels(level_distances(model, t, s, reading), (geo.height, geo.width), post.level_weights)
                maps[name].append((blur_map(amap, kernel) if kernel is not None else amap)[:, 0].numpy())
    sel = test.has_mask.astype(bool)
    valid = np.ones(test.masks[sel].shape, dtype=bool) if test.valid is None else test.valid[sel]
    print(f"{args.checkpoint} (level weights {post.level_weights or 'all 1'}, blur {post.blur_sigma}, top {post.topk(geo.height, geo.width)} pixels)")
    for name in READINGS:
        m = np.concatenate(maps[name])
        scores = image_score(torch.from_numpy(m[:, None]), post.topk(geo.height, geo.width)).numpy()
        pixel = roc_auc_score(test.masks[sel].astype(bool)[valid], m[sel][valid])
        print(f"  {name:42s} image AUROC {roc_auc_score(test.labels, scores):.3f}  pixel AUROC {pixel:.4f}", flush=True)


if __name__ == "__main__":
    main()
