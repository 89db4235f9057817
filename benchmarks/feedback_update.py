"""An operator's false calls taught to a memory model: `stfpm-edge update` on good images the model rejects.

    python benchmarks/feedback_update.py runs/bottle/model.pt --data ../shared/data/mvtec/bottle --dim 0.6 --add 5 --held 5

The first ``--add + --held`` good test images are dimmed (pixel values times ``--dim``: a lamp at that
brightness), so the model rejects them. ``--add`` of them are given to ``train.add_good_images`` (what
`stfpm-edge update` runs); the other ``--held`` are never shown to it. Printed: how many of each group the
model rejects before and after, the update's time and its threshold, and the test set's image / pixel AUROC,
misses and false calls before and after (the test images themselves, undimmed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--dim", type=float, default=0.6)
    ap.add_argument("--add", type=int, default=5)
    ap.add_argument("--held", type=int, default=5)
    args = ap.parse_args()
    from stfpm_edge.datasets import Sample, discover, list_images, load_images
    from stfpm_edge.engines.torch_engine import TorchEngine
    from stfpm_edge.evaluate import evaluate
    from stfpm_edge.train import add_good_images

    dataset = discover(args.data)
    good = [s.path for s in dataset.test if s.label == 0][: args.add + args.held]
    with tempfile.TemporaryDirectory() as tmp:
        groups = {"added": Path(tmp) / "added", "held": Path(tmp) / "held"}
        for i, path in enumerate(good):
            folder = groups["added" if i < args.add else "held"]
            folder.mkdir(exist_ok=True)
            dimmed = np.clip(cv2.imread(str(path)).astype(np.float32) * args.dim, 0, 255).astype(np.uint8)
            cv2.imwrite(str(folder / path.name), dimmed)

        def report(model: Path, when: str) -> None:
            with TorchEngine(model) as engine:
                for name, folder in groups.items():
                    imgs, _ = load_images([Sample(p, 0) for p in list_images(folder)], engine.geometry)
                    scores = engine.infer(imgs)[1]
                    print(f"{when}: {int((scores > engine.threshold).sum())} of {len(scores)} {name} dimmed good images rejected "
                          f"(threshold {engine.threshold:.5f}; scores {[round(float(v), 5) for v in scores]})")
                m = evaluate(engine.infer, dataset.test, engine.geometry, engine.threshold, progress=False).metrics
                print(f"{when}: test image / pixel AUROC {m['image_auroc']:.4f} / {m['pixel_auroc']:.4f}; "
                      f"{m['defects_missed']} of {m['n_anomalous']} defective images passed, {m['good_flagged']} good rejected")

        report(args.model, "before")
        t0 = time.perf_counter()
        event = add_good_images(args.model, [groups["added"]], Path(tmp) / "updated.pt", progress=False)
        print(f"update: {event['added_good_images']} images, {'+'.join(map(str, event['rows_added_per_level']))} memory rows, "
              f"threshold {event['old_threshold']:.5f} -> {event['new_threshold']:.5f}, {time.perf_counter() - t0:.1f} s")
        report(Path(tmp) / "updated.pt", "after")


if __name__ == "__main__":
    main()
