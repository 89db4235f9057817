"""Peak resident memory and time per epoch of `train` as the number of good images grows.

    python benchmarks/train_memory.py --images 500 4000 --epochs 1 --threads 2                 # a student, one epoch
    python benchmarks/train_memory.py --images 500 4000 --reference memory --threads 2        # the default memory bank

For each count, a generated data set of that many 256x256 good images (plus a few test images)
is written to a temporary folder and one training run (``--epochs``) runs in a fresh process;
its peak RSS comes from the kernel (the child's own ``ru_maxrss``), its seconds per epoch from the
run's metrics. The images and the teacher's features live in the training store on disk, so
the memory should grow far slower than the image count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, torch
from stfpm_edge.config import load_config
from stfpm_edge.train import train
torch.set_num_threads({threads})
cfg = load_config(None, dict(data={data!r}, out={out!r}, epochs={epochs}, height=256, width=256, overlays=0, reference={reference!r}))
_, m = train(cfg, progress=False)
print(json.dumps({{"seconds_per_epoch": m["seconds_per_epoch"], "memory_s": (m.get("memory") or {{}}).get("seconds"),
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[500, 4000])
    ap.add_argument("--epochs", type=int, default=1, help="student epochs")
    ap.add_argument("--reference", choices=("student", "memory"), default="student")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    from stfpm_edge.synthetic import make_mvtec_like

    rows = []
    for n in args.images:
        with tempfile.TemporaryDirectory(prefix="stfpm-mem-") as tmp:
            t0 = time.time()
            data = make_mvtec_like(Path(tmp) / "data", n_train=n, n_test_good=4, n_test_defect=4, height=256, width=256, seed=0)
            gen_s = time.time() - t0
            t0 = time.time()
            code = CHILD.format(threads=args.threads, data=str(data), out=str(Path(tmp) / "run"), epochs=args.epochs, reference=args.reference)
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            wall = time.time() - t0
            if res.returncode != 0:
                raise SystemExit(res.stderr[-2000:])
            out = json.loads(res.stdout.strip().splitlines()[-1])
            peak_kb = out["peak_kb"]  # the child's own peak (ru_maxrss, kB on Linux)
            per_epoch = out["seconds_per_epoch"]
            row = {"images": n, "reference": args.reference, "peak_rss_mb": round(peak_kb / 1024, 1),
                   "seconds_per_epoch": round(per_epoch, 1) if per_epoch is not None else None,
                   "memory_build_s": round(out["memory_s"], 1) if out["memory_s"] is not None else None,
                   "run_wall_s": round(wall, 1), "generate_s": round(gen_s, 1), "epochs": args.epochs, "threads": args.threads}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| good images | reference | peak RSS MB | s / epoch (student) or bank build s (memory) | whole run s |\n|---|---|---|---|---|")
    for r in rows:
        cost = r["seconds_per_epoch"] if r["reference"] == "student" else r["memory_build_s"]
        print(f"| {r['images']} | {r['reference']} | {r['peak_rss_mb']} | {cost} | {r['run_wall_s']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
