"""Which feature level of a trained student carries its image score (issue 17).

    python benchmarks/map_levels.py RUN/model.pt --data ../shared/data/mvtec/screw [--pool 2,2,1] [--other RUN2/model.pt]

Per level, the teacher-student distance map (the checkpoint's own metric: cosine, or l2 for a
standardised teacher), upsampled and smoothed as the checkpoint does, then image AUROC of its
maximum over the test images; and the same for the product of all levels (the deployed map), the
sum, and the products of neighbouring levels. ``--pool`` averages teacher and student features of
each level over k x k blocks before the distance (the memory's pooling, tried on the student).
``--other``: a second student on the same data; the product of this one's levels but the last with
the other's last level, and of both students' maps (an ensemble probe: it would cost a second student).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    from sklearn.metrics import roc_auc_score

    from stfpm_edge.checkpoint import load_checkpoint
    from stfpm_edge.datasets import discover
    from stfpm_edge.geometry import Geometry
    from stfpm_edge.store import TrainingStore

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="the MVTec category folder it was trained on")
    ap.add_argument("--pool", default="", help="per level, average k x k feature blocks first, e.g. 2,2,1 (default: none)")
    ap.add_argument("--other", type=Path, help="a second student's checkpoint on the same data (ensemble probe)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    test = discover(args.data, seed=0).test
    labels = np.array([s.label for s in test])
    pools = [int(v) for v in args.pool.split(",") if v.strip()]
    model, meta = load_checkpoint(args.checkpoint)
    geo = Geometry(meta["geometry"]["height"], meta["geometry"]["width"], meta["geometry"]["resize"])
    with TrainingStore() as store:
        images = store.images("test", test, geo, True, "test images")
        maps = level_maps(model, images, geo, pools)
        other = level_maps(load_checkpoint(args.other)[0], images, geo, pools) if args.other else None

    def auroc(m: np.ndarray) -> str:
        return f"{roc_auc_score(labels, m.reshape(len(labels), -1).max(axis=1)):.3f}"

    print(f"{args.checkpoint} (metric {'/'.join(model.metric)}, blur {model.post.blur_sigma}, pool {pools or 'none'}): image AUROC of the map's maximum")
    for k, m in enumerate(maps):
        print(f"  level {k} alone: {auroc(m)}")
    print(f"  product of all (deployed): {auroc(np.prod(maps, axis=0))} | sum: {auroc(np.sum(maps, axis=0))}")
    for k in range(len(maps) - 1):
        print(f"  levels {k},{k + 1} product: {auroc(maps[k] * maps[k + 1])}")
    if other is not None:
        print(f"  with {args.other}: its levels alone {', '.join(auroc(m) for m in other)}; this one's levels but the last x its last: "
              f"{auroc(np.prod(maps[:-1], axis=0) * other[-1])}; both maps multiplied: {auroc(np.prod(maps, axis=0) * np.prod(other, axis=0))}")


def level_maps(model, images, geo, pools: list[int]) -> list[np.ndarray]:
    """Per level, the smoothed, upsampled distance map of every image [N, H, W]."""
    from stfpm_edge.model import METRICS, blur_map, combine_levels, gaussian_kernel

    kernel = gaussian_kernel(model.post.blur_sigma) if model.post.blur_sigma > 0 else None
    levels: list[list[np.ndarray]] = []
    with torch.inference_mode():
        for i in range(0, len(images), 8):
            t, s = model.features(model.normalize(torch.from_numpy(images[i : i + 8])))
            for k, (a, b) in enumerate(zip(t, s)):
                if k < len(pools) and pools[k] > 1:
                    a, b = F.avg_pool2d(a, pools[k]), F.avg_pool2d(b, pools[k])
                d = combine_levels([METRICS[model.metric[k]](a.float(), b.float())], (geo.height, geo.width))  # one level: the model's upsampling
                if kernel is not None:
                    d = blur_map(d, kernel)
                if len(levels) <= k:
                    levels.append([])
                levels[k].append(d[:, 0].numpy())
    return [np.concatenate(v) for v in levels]


if __name__ == "__main__":
    main()
