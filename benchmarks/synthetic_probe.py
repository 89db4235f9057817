"""Can good images with planted defects tell a good student training from a bad one? (issue 17)

    python benchmarks/synthetic_probe.py RUN1/model.pt RUN2/model.pt ... [--threads 1]

Trainings of one student setting differ by up to 0.09 image AUROC on screw, and the validation
loss that picks the epoch does not see it. This probe asks whether a signal available without any
real defect would: for each checkpoint, the held-out good images of its own training (validation
and calibration splits, from its stored config) and copies of them with one planted defect each,
scored by the checkpoint's own image score; printed: the image AUROC of good against planted, per
kind of defect (``synthetic.add_defect``'s scratch / stain / hole, drawn into a quarter-size tile
of the image, and a "cutpaste": a square of another good image, 6-12% of the side, pasted elsewhere), next
to the checkpoint's test-set image AUROC from its metrics.json. Nothing here trains or changes a
model; it reads checkpoints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def planted(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """One defect per image (model-input frames, uint8 RGB); the same images get the same defects (seeded).

    Each checkpoint is probed on its own held-out split, which depends on its training seed.
    """
    from stfpm_edge.synthetic import add_defect

    rng = np.random.default_rng(seed)
    out = images.copy()
    n, h, w = images.shape[:3]
    for i in range(n):
        if kind == "cutpaste":
            side = int(rng.uniform(0.06, 0.12) * min(h, w))
            src = images[(i + 1 + int(rng.integers(n - 1))) % n] if n > 1 else images[i]
            y0, x0 = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            y1, x1 = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            out[i, y1 : y1 + side, x1 : x1 + side] = src[y0 : y0 + side, x0 : x0 + side]
        else:
            # add_defect sizes a defect by the image it is given: drawn into a quarter-size tile of the image
            th, tw = h // 4, w // 4
            y1, x1 = int(rng.integers(0, h - th)), int(rng.integers(0, w - tw))
            out[i, y1 : y1 + th, x1 : x1 + tw] = add_defect(np.ascontiguousarray(out[i, y1 : y1 + th, x1 : x1 + tw]), rng, kind)[0]
    return out


def main() -> None:
    import torch
    from sklearn.metrics import roc_auc_score

    from stfpm_edge.checkpoint import load_checkpoint
    from stfpm_edge.config import load_config
    from stfpm_edge.datasets import discover, heldout_splits, load_images
    from stfpm_edge.engines.torch_engine import TorchEngine
    from stfpm_edge.evaluate import predict

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", type=Path, nargs="+", help="model.pt of trained runs (metrics.json beside each)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = ("scratch", "stain", "hole", "cutpaste")
    print("checkpoint | test image AUROC | planted: " + " / ".join(kinds) + " | all")
    for path in args.checkpoints:
        model, meta = load_checkpoint(path)
        cfg = load_config(None, meta["config"])
        ds = discover(cfg.data, seed=cfg.seed)
        _, val_s, calib_s = heldout_splits(ds.train, cfg.val_fraction, cfg.calib_fraction, cfg.seed)
        engine = TorchEngine.from_model(model, meta)
        good, _ = load_images(val_s + calib_s, engine.geometry)
        _, good_scores = predict(engine.infer, good)
        aurocs, every = [], []
        for k in kinds:
            _, bad_scores = predict(engine.infer, planted(good, k))
            every.append(bad_scores)
            aurocs.append(roc_auc_score(np.r_[np.zeros(len(good)), np.ones(len(good))], np.r_[good_scores, bad_scores]))
        bad = np.concatenate(every)
        overall = roc_auc_score(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good_scores, bad])
        metrics = path.parent / "metrics.json"
        test = json.loads(metrics.read_text()).get("image_auroc") if metrics.is_file() else None
        test_s = f"{test:.3f}" if test is not None else "-"
        print(f"{path.parent.name} | {test_s} | " + " / ".join(f"{a:.3f}" for a in aurocs) + f" | {overall:.3f}", flush=True)


if __name__ == "__main__":
    main()
