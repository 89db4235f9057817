"""Squash versus letterbox on non-square parts: the same generated 2.5:1 data set, one model each.

    python benchmarks/aspect_modes.py --epochs 30 --size 128

The data is generated (procedural texture, planted defects): it shows how the two geometries
compare on a wide part, not accuracy on real parts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from stfpm_edge.config import load_config
from stfpm_edge.synthetic import make_mvtec_like
from stfpm_edge.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--height", type=int, default=240, help="source image height (width is 2.5x)")
    args = ap.parse_args()
    h, w = args.height, int(args.height * 2.5)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_mvtec_like(Path(tmp) / "wide", n_train=100, n_test_good=20, n_test_defect=30, height=h, width=w, seed=3)
        for mode in ("squash", "letterbox"):
            cfg = load_config(None, dict(data=str(data), out=str(Path(tmp) / mode), epochs=args.epochs, batch_size=16,
                                         height=args.size, width=args.size, resize=mode, overlays=0, reference="student"))
            _, m = train(cfg, progress=False)
            results[mode] = {k: m[k] for k in ("image_auroc", "pixel_auroc", "pixel_f1", "aupro", "image_f1")}
    print(json.dumps({"source": [h, w], "model": [args.size, args.size], "epochs": args.epochs, "results": results}, indent=2))


if __name__ == "__main__":
    main()
