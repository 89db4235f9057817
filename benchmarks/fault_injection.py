"""Faults a line really has, injected into real `stfpm-edge` processes; one row per scenario.

    python benchmarks/fault_injection.py --out /tmp/faults [--tmpfs]

A small model is trained on generated data (64x64, 2 epochs) and exported; then, each in a fresh
process of the real CLI:

- SIGINT / SIGTERM / SIGKILL at a random moment of `run` (area-scan video, line-scan web) and `train`;
- a full disk: `run` writing into a 2 MB tmpfs (``--tmpfs``, needs root) or, without it, a simulated
  ENOSPC on every anomaly picture;
- two runs aimed at one folder at the same time;
- a live source that dies and comes back (an RTSP-like source simulated in-process).

For each: the exit code, whether every frame read is accounted for in whole JSONL lines
(read = inspected + failed + dropped, every line parses), and whether any output is corrupt
(JSON files parse, checkpoints load). Random moments come from ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
CLI = [PY, "-m", "stfpm_edge.cli"]


def jsonl_ok(path: Path) -> tuple[bool, int]:
    if not path.is_file():
        return True, 0
    text = path.read_text()
    lines = text.splitlines()
    try:
        for line in lines:
            json.loads(line)
    except json.JSONDecodeError:
        return False, len(lines)
    return text == "" or text.endswith("\n"), len(lines)


def accounted(out: Path) -> str:
    ok, n = jsonl_ok(out / "frames.jsonl")
    if not ok:
        return "partial line!"
    summ = out / "summary.json"
    if not summ.is_file():
        return f"{n} whole lines, no summary"
    s = json.loads(summ.read_text())
    if s.get("status") == "running":  # the placeholder reserved at the start: the process never reached its end (SIGKILL)
        return f"{n} whole lines, summary still the start's placeholder ('running')"
    frames = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
    recs = sum(1 for r in frames if r.get("status") in ("inspected", "failed"))
    lost = s.get("records_lost", 0)  # records a full disk refused: counted in the summary, never half-written
    fine = s["frames_read"] == s["frames_inspected"] + s["frames_failed"] + s["frames_dropped"] and recs + lost == s["frames_inspected"] + s["frames_failed"]
    return (f"{'yes' if fine else 'NO'}: read {s['frames_read']} = {s['frames_inspected']} + {s['frames_failed']} + {s['frames_dropped']}, {recs} records"
            + (f" + {lost} counted as lost" if lost else ""))


def corrupt_files(folder: Path) -> list[str]:
    bad = []
    for p in folder.rglob("*.json"):
        try:
            json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad.append(str(p))
    for p in folder.rglob("*.pt"):
        try:
            import torch

            torch.load(p, map_location="cpu", weights_only=True)
        except Exception:
            bad.append(str(p))
    return bad


def signal_at_random(cmd: list[str], sig: int, lo: float, hi: float, rng: random.Random, timeout: float = 120) -> tuple[int, float]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t = rng.uniform(lo, hi)
    time.sleep(t)
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -999, t  # did not stop: a hang
    return proc.returncode, t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmpfs", action="store_true", help="mount a 2 MB tmpfs for the full-disk case (root)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    from stfpm_edge.demo import make_video, make_web
    from stfpm_edge.synthetic import make_mvtec_like

    data = make_mvtec_like(out / "data", n_train=24, n_test_good=4, n_test_defect=4, height=128, width=128, seed=1)
    subprocess.run(CLI + ["train", "--data", str(data), "--out", str(out / "model"), "--size", "64", "--epochs", "2", "--batch-size", "8"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(CLI + ["export", str(out / "model" / "model.pt"), "--out", str(out / "model.onnx")], check=True, stdout=subprocess.DEVNULL)
    video = out / "video.mp4"
    make_video(video, 1500, (128, 128), every=10, seed=2)
    rows = []

    def record(name: str, code: int, when: float | None, folder: Path, frames: bool = True) -> None:
        row = {"scenario": name, "exit": "HANG" if code == -999 else code, "at_s": None if when is None else round(when, 2),
               "accounted": accounted(folder) if frames else "-", "corrupt": corrupt_files(folder) or "none"}
        rows.append(row)
        print(json.dumps(row), flush=True)

    run = CLI + ["run", str(out / "model.onnx"), "--source", str(video)]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        folder = out / f"run-{sig.name}"
        code, t = signal_at_random(run + ["--out", str(folder)], sig, 1.0, 4.0, rng)
        record(f"run, {sig.name}", code, t, folder)
    import cv2

    web = out / "web"
    web.mkdir(exist_ok=True)
    strip = make_web(4000, 256, [500, 1500, 3000], seed=3)
    for i in range(0, len(strip), 16):  # the web arrives 16 rows at a time, one image per block
        cv2.imwrite(str(web / f"{i // 16:05d}.png"), strip[i : i + 16])
    for sig in (signal.SIGINT, signal.SIGTERM):
        folder = out / f"linescan-{sig.name}"
        code, t = signal_at_random(CLI + ["run", str(out / "model.onnx"), "--source", str(web), "--line-scan", "--out", str(folder)], sig, 1.0, 3.0, rng)
        rows.append({"scenario": f"line-scan, {sig.name}", "exit": "HANG" if code == -999 else code, "at_s": round(t, 2),
                     "accounted": "tiles.jsonl whole" if jsonl_ok(folder / "tiles.jsonl")[0] else "partial line!", "corrupt": corrupt_files(folder) or "none"})
        print(json.dumps(rows[-1]), flush=True)
    for sig in (signal.SIGINT, signal.SIGKILL):
        folder = out / f"train-{sig.name}"
        code, t = signal_at_random(CLI + ["train", "--data", str(data), "--out", str(folder), "--size", "64", "--epochs", "2000", "--batch-size", "8",
                                           "--reference", "student"],
                                   sig, 4.0, 10.0, rng)
        record(f"train, {sig.name}", code, t, folder, frames=False)
        # resume, finishing soon: epochs may change on --resume, everything else is the run's own
        resumed = subprocess.run(CLI + ["train", "--data", str(data), "--out", str(folder), "--epochs", "40", "--resume"], capture_output=True, text=True)
        record(f"train, {sig.name}, then --resume", resumed.returncode, None, folder, frames=False)

    # two runs aimed at one folder, started together
    folder = out / "shared"
    a = subprocess.Popen(run + ["--out", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    b = subprocess.Popen(run + ["--out", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    codes = sorted([a.wait(), b.wait()])
    record(f"two runs, one --out (exits {codes})", codes[-1], None, folder)

    # full disk
    if args.tmpfs:
        small = out / "tmpfs"
        small.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
        try:
            res = subprocess.run(run + ["--out", str(small / "run"), "--save-video", str(small / "run.mp4")], capture_output=True, text=True)
            record("run into a 2 MB tmpfs", res.returncode, None, small / "run")
            rows[-1]["stderr"] = res.stderr.strip().splitlines()[-3:]
            print(rows[-1]["stderr"], flush=True)
        finally:
            subprocess.run(["umount", str(small)])
    else:
        code = (
            "import errno, sys; import stfpm_edge.stream.outputs as o\n"
            "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "o.atomic_write_bytes = full\n"
            "from stfpm_edge.cli import main; sys.argv = ['stfpm-edge'] + sys.argv[1:]; main()\n"
        )
        folder = out / "full-disk"
        res = subprocess.run([PY, "-c", code] + run[3:] + ["--out", str(folder)], capture_output=True, text=True)
        record("run, anomaly pictures hit ENOSPC (simulated)", res.returncode, None, folder)

    print("| scenario | exit | at s | every frame accounted in whole JSONL lines | corrupt outputs |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['exit']} | {r['at_s'] if r['at_s'] is not None else '-'} | {r['accounted']} | {r['corrupt']} |")
    (out / "faults.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
