"""Many cameras, one engine (issue 12): one `stfpm-edge run` with 4 sources, frames batched across the
sources into one engine call, against the same run with `--max-batch 1` (one frame per call, the
sources in turn), interleaved (batched, unbatched, batched, unbatched) so that both see the same
machine; and each source's records against a single-source run of that source.

    python benchmarks/multi_camera.py /tmp/bd/bottle/model.onnx --data ../shared/data/mvtec/bottle --out /tmp/multi

Needs a graph exported with --dynamic (a fixed batch of 1 cannot batch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from line_sinks import make_video  # noqa: E402

CLI = [sys.executable, "-m", "stfpm_edge.cli"]


def run(model: Path, sources: list[Path], out: Path, threads: int, *extra: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = CLI + ["run", str(model), "--out", str(out), "--threads", str(threads), "--no-save-anomalies", *extra]
    for s in sources:
        cmd += ["--source", str(s)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def records(out: Path, source: str | None = None) -> list[dict]:
    rows = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]
    return [r for r in rows if "frame" in r and (source is None or r.get("source") == source)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/multi-camera"))
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    video = args.out / "parts.mp4"
    make_video(args.data, video, args.frames, args.side)
    cams = []
    for i in range(args.sources):  # one file per camera (a source is named by its path)
        cams.append(args.out / f"cam{i}.mp4")
        shutil.copyfile(video, cams[-1])

    rows = {"batched": [], "batch 1": []}
    for rep in range(2):
        rows["batched"].append(run(args.model, cams, args.out / f"batched{rep}", args.threads))
        rows["batch 1"].append(run(args.model, cams, args.out / f"single-calls{rep}", args.threads, "--max-batch", "1"))
    print(f"\n{args.sources} sources x {args.frames} frames, one process, {args.model.name}, ONNX Runtime {args.threads} threads")
    print("| mode | run | frames inspected | accounted | FPS (all sources) |")
    print("|---|---|---|---|---|")
    for mode, sums in rows.items():
        for rep, s in enumerate(sums):
            print(f"| {mode} | {rep + 1} | {s['frames_inspected']} | {s['accounted']} | {s['fps']:.1f} |")
    fb = sum(s["fps"] for s in rows["batched"]) / 2
    f1 = sum(s["fps"] for s in rows["batch 1"]) / 2
    print(f"\nbatched / batch 1 throughput: {fb / f1:.2f}x (means of the two interleaved repeats)")

    single = run(args.model, [cams[0]], args.out / "alone", args.threads)
    mine = records(args.out / "batched0", f"video {cams[0]}")
    alone = records(args.out / "alone")
    same = sum(a["verdict"] == b["verdict"] and a["frame"] == b["frame"] for a, b in zip(mine, alone))
    dmax = max(abs(a["score"] - b["score"]) for a, b in zip(mine, alone))
    print(f"source 0 in the batched run vs alone: {same} of {len(alone)} records with the same frame and verdict, "
          f"max |delta score| {dmax:.2e} ({single['frames_inspected']} frames alone)")


if __name__ == "__main__":
    main()
