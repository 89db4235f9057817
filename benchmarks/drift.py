"""A lamp that fades: does `run` raise drift before the false calls begin, and never on a line that does not change?

    python benchmarks/drift.py runs/bottle/model.pt --data ../shared/data/mvtec/bottle --frames 400 --fade-from 100 --fade 0.002

The good test images (``DATA/test/good``, never seen in training) are played as a stream in a seeded
random order, twice: unchanged, and with every frame from ``--fade-from`` on darkened by ``--fade`` per
frame (pixel values x (1 - fade x (i - fade_from)): a lamp losing light). Both go through the run loop
(``run_stream``, the engine ``stfpm-edge run`` opens). Printed: drift events of each run (frame, which
numbers moved), the first false call the fade caused (a frame flagged that the same image unfaded was
not), and how many frames separate the two.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="an MVTec-layout folder; its test/good images are the stream")
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--fade-from", type=int, default=100)
    ap.add_argument("--fade", type=float, default=0.002, help="share of the light lost per frame after --fade-from")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from stfpm_edge.datasets import list_images
    from stfpm_edge.engines.base import open_engine
    from stfpm_edge.geometry import decode_image
    from stfpm_edge.stream.pipeline import RunOptions, run_stream
    from stfpm_edge.stream.sources import IterSource

    paths = list_images(args.data / "test" / "good")
    images = [decode_image(p) for p in paths]
    order = np.random.default_rng(args.seed).integers(0, len(images), args.frames)
    steady = [images[k] for k in order]
    factor = [1.0 if i < args.fade_from else max(0.0, 1.0 - args.fade * (i - args.fade_from)) for i in range(args.frames)]
    fading = [(img * f).astype(np.uint8) if f < 1 else img for img, f in zip(steady, factor)]

    def play(frames, out):
        summary = run_stream(lambda: open_engine(args.model), IterSource(frames), RunOptions(out, save_anomalies=False))
        return summary, [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]

    with tempfile.TemporaryDirectory() as tmp:
        s_steady, r_steady = play(steady, Path(tmp) / "steady")
        s_fade, r_fade = play(fading, Path(tmp) / "fading")
    flagged_steady = {r["frame"] for r in r_steady if r.get("verdict") == "anomalous"}
    caused = sorted(r["frame"] for r in r_fade if r.get("verdict") == "anomalous" and r["frame"] not in flagged_steady)
    print(f"model {args.model}; {len(images)} good test images of {args.data} played as {args.frames} frames (seed {args.seed}); "
          f"drift reference: {s_steady['drift']['reference_from']}")
    for name, summary, records in (("unchanged", s_steady, r_steady), ("fading", s_fade, r_fade)):
        events = [r for r in records if r.get("event") == "drift"]
        print(f"{name}: {summary['frames_inspected']} inspected, {summary['frames_anomalous']} flagged, {len(events)} drift events")
        for e in events:
            moved = ", ".join(f"{q} {v['recent_median']:.4g} vs {v['reference']:.4g} ({v['z']:+.1f})" for q, v in e["quantities"].items())
            print(f"  frame {e['frame']}: drift {e['state']}: {moved}")
    raised = next((r["frame"] for r in r_fade if r.get("event") == "drift" and r["state"] == "raised"), None)
    first = caused[0] if caused else None
    if raised is not None:
        print(f"drift raised at frame {raised} (light at {factor[raised]:.3f} of its start)")
    if first is not None:
        print(f"first false call caused by the fade: frame {first} (light at {factor[first]:.3f}); {len(caused)} in all")
    if raised is not None and first is not None:
        print(f"drift came {first - raised} frames before the first false call" if raised < first else "drift came AFTER the first false call")


if __name__ == "__main__":
    main()
