"""How far can the teacher's features separate a category at all? A nearest-neighbour probe (issue 10).

    python benchmarks/feature_ceiling.py --data ../shared/data/mvtec/screw --size 256 --threads 1
    python benchmarks/feature_ceiling.py --data ../shared/data/mvtec/screw --size 384 --layers 1,2,3 --bank 200000

STFPM scores a position by how far the student's feature is from the teacher's. A student can only
make a defect stand out where the teacher's features of that defect differ from the teacher's
features of good parts. This probe measures that directly, with no student: every test position's
distance to its nearest neighbour among the teacher features of the good training images (the same
normalised features, the same ``0.5 * ||a - b||^2`` per level, levels upsampled and multiplied,
the same Gaussian smoothing and max score: the model's own ``MemoryBank`` map, with random rows). If the probe is far from a target, a
better student on the same teacher and input size is unlikely to reach it: the lever is the
teacher or the resolution.

The bank of each level is capped at ``--bank`` positions, drawn at random (seeded) from the good
training images; the row says when a level was capped. Prints one JSON object; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--layers", default="", help="feature levels, e.g. 1,2,3 (the backbone's default when empty)")
    ap.add_argument("--blur", type=float, default=4.0, help="map smoothing sigma in pixels, as the model's --blur")
    ap.add_argument("--bank", type=int, default=200_000, help="most bank positions per level (random, seeded)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from stfpm_edge.backbones import resolve_layers
    from stfpm_edge.datasets import discover, load_images
    from stfpm_edge.engines.torch_engine import TorchEngine
    from stfpm_edge.evaluate import TestSet, predict
    from stfpm_edge.geometry import Geometry
    from stfpm_edge.model import STFPM, MapPost, MemoryBank

    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",") if x.strip()] or None
    model = STFPM.build(args.backbone, layers=layers, post=MapPost(blur_sigma=args.blur)).eval()
    geometry = Geometry(args.size, args.size)
    ds = discover(args.data)
    t0 = time.perf_counter()

    # every good training position, normalised, per level; then at most --bank of them at random
    train_images, _ = load_images(ds.train, geometry, progress=True, desc="good training images")
    levels: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for i in range(0, len(train_images), 8):
            for k, f in enumerate(model.teacher(model.normalize(torch.from_numpy(train_images[i : i + 8])))):
                if len(levels) <= k:
                    levels.append([])
                levels[k].append(F.normalize(f.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
    rng = np.random.default_rng(0)
    banks, capped = [], []
    for rows in levels:
        flat = torch.cat(rows)
        capped.append(len(flat) > args.bank)
        if capped[-1]:
            flat = flat[torch.from_numpy(rng.choice(len(flat), args.bank, replace=False))]
        banks.append(flat)
    # the product's own map with these rows in the student's place: nearest row, levels multiplied, blur, max
    model.student = MemoryBank(banks)
    test = TestSet.load(ds.test, geometry, progress=True)
    maps, scores = predict(TorchEngine.from_model(model, {"geometry": geometry.to_dict()}).infer, test.images, progress=True)
    m = test.metrics(maps, scores, None)
    print(json.dumps({
        "data": str(args.data), "backbone": args.backbone, "levels": list(resolve_layers(args.backbone, layers)),
        "size": args.size, "blur": args.blur, "bank_per_level": [len(b) for b in banks], "bank_capped": capped,
        "train_images": len(ds.train), "test_images": len(ds.test),
        **{k: (round(m[k], 4) if m[k] is not None else None) for k in ("image_auroc", "pixel_auroc", "pixel_f1", "aupro")},
        "seconds": round(time.perf_counter() - t0, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
