"""Where do image scores come from? For each test image, is the map's maximum on the part or on the background?

    python benchmarks/score_peaks.py runs/screw/model.pt --data ../shared/data/mvtec/screw

The part is segmented per image with Otsu's threshold on the grey image (the darker class is the
part, as for a metal part on a bright table), dilated by ``--dilate`` pixels at model size. A good
image whose maximum lies on the background is a false-alarm source that better part features
cannot fix (dust, texture of the table); a defect image whose maximum lies on the background is
a detection that was outscored by the table. Prints counts and writes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np


def part_mask(img_bgr: np.ndarray, dilate: int) -> np.ndarray:
    grey = cv2.cvtColor(img_bgr, cv2.COLOR_BGR2GRAY)
    _, dark = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    if dilate > 0:
        dark = cv2.dilate(dark, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1)))
    return dark.astype(bool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--dilate", type=int, default=4)
    args = ap.parse_args()
    from stfpm_edge.datasets import discover, load_images
    from stfpm_edge.engines import open_engine
    from stfpm_edge.evaluate import predict

    with open_engine(args.model) as engine:
        ds = discover(args.data)
        frames, _ = load_images(ds.test, engine.geometry)
        maps, scores = predict(engine.infer, frames)
    out = {}
    for label, name in ((0, "good"), (1, "defective")):
        idx = [i for i, s in enumerate(ds.test) if s.label == label]
        on_bg = 0
        for i in idx:
            r, c = np.unravel_index(int(np.argmax(maps[i])), maps[i].shape)
            on_bg += not part_mask(frames[i], args.dilate)[r, c]
        out[name] = {"images": len(idx), "max_on_background": on_bg, "share": on_bg / max(1, len(idx))}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
