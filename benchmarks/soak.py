"""Soak the camera loop: N frames through a real engine, resident memory sampled as it goes.

    python benchmarks/soak.py --model runs/x/model.onnx --frames 100000 --out /tmp/soak

Frames are generated in memory (small, at the model size, every 50th with a dark defect) and fed
as a lossless source, so every frame must come out as one JSONL record. RSS (VmRSS) is sampled
every second together with the number of frames handed over; the report gives the growth per
10,000 frames after a 10,000-frame warm-up, and whether read = inspected + failed + dropped.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help=".onnx (or any engine file)")
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trace", type=int, nargs="*", metavar="FRAME", help="tracemalloc snapshots when these frame counts are reached "
                    "(e.g. 1500 10000 20000); the report lists the source lines whose Python allocations grew most between them")
    args = ap.parse_args()
    if args.trace:
        import tracemalloc

        tracemalloc.start(1)
    from stfpm_edge.engines import open_engine
    from stfpm_edge.stream.pipeline import RunOptions, run_stream
    from stfpm_edge.stream.sources import IterSource

    with open_engine(args.model) as e:
        h, w = e.geometry.height, e.geometry.width
    rng = np.random.default_rng(0)
    base = rng.integers(120, 200, (16, h, w, 3), dtype=np.uint8)
    handed = {"n": 0}

    def frames():
        for i in range(args.frames):
            img = base[i % 16].copy()
            if i % 50 == 0:
                img[h // 3 : h // 3 + 6, w // 3 : w // 3 + 6] = 0
            handed["n"] = i + 1
            yield img

    samples: list[tuple[int, float]] = []
    done = threading.Event()

    snapshots: list = []
    marks = sorted(args.trace or [])

    def sampler():
        while not done.wait(1.0):
            samples.append((handed["n"], rss_mb()))
            while marks and handed["n"] >= marks[0]:
                import tracemalloc

                snapshots.append((handed["n"], tracemalloc.take_snapshot()))
                marks.pop(0)

    threading.Thread(target=sampler, daemon=True).start()
    t0 = time.time()
    summary = run_stream(lambda: open_engine(args.model, threads=args.threads), IterSource(frames()), RunOptions(args.out, save_anomalies=True))
    done.set()
    wall = time.time() - t0
    lines = sum(1 for _ in (args.out / "frames.jsonl").open())
    after_warmup = [(n, r) for n, r in samples if n >= 10_000]
    slope = float(np.polyfit([n for n, _ in after_warmup], [r for _, r in after_warmup], 1)[0]) * 10_000 if len(after_warmup) > 2 else None
    report = {
        "frames": args.frames, "read": summary["frames_read"], "inspected": summary["frames_inspected"], "failed": summary["frames_failed"],
        "dropped": summary["frames_dropped"], "accounted": summary["accounted"], "jsonl_lines": lines, "fps": summary["fps"], "wall_s": round(wall, 1),
        "rss_mb_at_10k": next((r for n, r in samples if n >= 10_000), None), "rss_mb_end": samples[-1][1] if samples else None,
        "rss_growth_mb_per_10k_frames": slope, "anomaly_files": len(list((args.out / "anomalies").iterdir())),
        "samples": samples[:: max(1, len(samples) // 50)],
    }
    growth = []
    for (n0, a), (n1, b) in zip(snapshots, snapshots[1:]):
        top = b.compare_to(a, "lineno")[:6]
        growth.append({"frames": [n0, n1], "top": [{"where": str(st.traceback[0]), "kb": round(st.size_diff / 1024, 1), "blocks": st.count_diff}
                                                   for st in top]})
    if growth:
        report["python_allocation_growth"] = growth
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
