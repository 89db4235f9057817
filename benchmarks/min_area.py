"""Does a minimum defect area lower false calls at the same misses? Each run's test images through its own model.

    python benchmarks/min_area.py RUN [RUN ...] --areas 0 16 64 256 1024

Each RUN is a folder of ``stfpm-edge train`` (model.pt); its data set's test split is read again and
inferred with the PyTorch engine. For each image above the model's threshold its defect regions
(``scoring.defect_regions``: 8-connected components of the map above the threshold, areas in the
source image's pixels) decide the verdict with ``scoring.verdict_with_area`` for every minimum area
given: printed are the defective images passed and the good images rejected at each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--areas", type=float, nargs="+", default=[0, 16, 64, 256, 1024], help="minimum areas, source pixels")
    args = ap.parse_args()
    from stfpm_edge.datasets import discover, load_images
    from stfpm_edge.engines.torch_engine import TorchEngine
    from stfpm_edge.evaluate import predict
    from stfpm_edge.scoring import defect_regions, verdict_with_area

    print("| run | images (good / defective) | " + " | ".join(f"min {a:g} px: passed / rejected" for a in args.areas) + " |")
    print("|---|---|" + "---|" * len(args.areas))
    for run in args.runs:
        with TorchEngine(run / "model.pt") as engine:
            meta, geo, thr = engine.meta, engine.geometry, engine.threshold
            dataset = discover(meta["dataset"]["root"], seed=meta["config"]["seed"])
            images, sizes = load_images(dataset.test, geo)
            maps, scores = predict(engine.infer, images)
        labels = np.array([s.label for s in dataset.test])
        cells = []
        for area in args.areas:
            verdicts = []
            for amap, score, size in zip(maps, scores, sizes):
                box = geo.content_box(*size)
                regions = defect_regions(amap, thr, (box.x0, box.y0, box.x1, box.y1), size) if score > thr else []
                verdicts.append(verdict_with_area(float(score), thr, regions, area or None, False) == "anomalous")
            flagged = np.array(verdicts)
            cells.append(f"{int((~flagged[labels == 1]).sum())} / {int(flagged[labels == 0].sum())}")
        print(f"| {run.name} | {int((labels == 0).sum())} / {int((labels == 1).sum())} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
