"""False alarms from video compression: the same generated parts, written losslessly and lossy.

    stfpm-edge demo --out runs/demo                                   # memory model (the default)
    stfpm-edge train --data runs/demo/data/weave --reference student --epochs 40 --size 128 --batch-size 16 --out runs/demo-student
    stfpm-edge export runs/demo-student/model.pt --out runs/demo-student/model.onnx
    python benchmarks/codec_shift.py runs/demo/model.onnx runs/demo-student/model.onnx

The models learned from PNG images of the demo's texture. Each video holds 300 new frames of it
(every 10th with a planted defect), written three ways: FFV1 (lossless, as a machine-vision camera
delivers frames), MJPG and MPEG-4 (lossy, as a compressed network stream). Every frame goes through
``stfpm-edge run``'s loop; the row counts defect frames flagged and good frames flagged. Prints a
Markdown table; writes only under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

CODECS = (("FFV1 (lossless)", ".mkv", "FFV1"), ("MJPG", ".avi", "MJPG"), ("MPEG-4 (mp4v)", ".mp4", "mp4v"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--side", type=int, default=256, help="frame side in pixels (the demo's models see them at half size)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/codec_shift"))
    args = ap.parse_args()
    from stfpm_edge.engines import open_engine
    from stfpm_edge.stream.pipeline import RunOptions, run_stream
    from stfpm_edge.stream.sources import open_source

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    from stfpm_edge.demo import make_video

    for name, suffix, fourcc in CODECS:
        video = args.out / f"video{suffix}"
        bad = set(make_video(video, args.frames, (args.side, args.side), every=10, seed=1, fourcc=fourcc))
        for model in args.models:
            run = args.out / "run"
            shutil.rmtree(run, ignore_errors=True)
            run_stream(lambda m=model: open_engine(m), open_source(str(video)), RunOptions(run))
            records = [json.loads(line) for line in (run / "frames.jsonl").read_text().splitlines()]
            flagged = {r["frame"] for r in records if r.get("verdict") == "anomalous"}
            rows.append((name, video.stat().st_size, str(model), len(flagged & bad), len(bad), len(flagged - bad), len(records) - len(bad)))
            print(json.dumps(dict(zip(("codec", "bytes", "model", "hits", "defect_frames", "false_alarms", "good_frames"), rows[-1]))), flush=True)
    print("| video | MB | model | defect frames flagged | good frames flagged |\n|---|---|---|---|---|")
    for name, size, model, hits, n_bad, fa, n_good in rows:
        print(f"| {name} | {size / 1e6:.1f} | {model} | {hits} / {n_bad} | {fa} / {n_good} |")


if __name__ == "__main__":
    main()
