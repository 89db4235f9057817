"""The paper's student reproduced, then each lever that might make it as good as the memory (issue 17).

    python benchmarks/student_levers.py --data ../shared/data/mvtec/screw --out /work/exp/student --variant paper-e100 --threads 1
    python benchmarks/student_levers.py --table /work/exp/student --threads 2     # one row per run, ONNX Runtime ms timed interleaved

Each variant is ``stfpm-edge train --reference student`` with a few options changed (VARIANTS, in
benchmarks/hard_parts.py, where the earlier student rows live too; a run folder holding
``metrics.json`` is reused, an interrupted one resumes). The table has image AUROC, pixel AUROC,
pixel F1, AUPRO, image F1, false alarms and misses at the operating threshold, ONNX Runtime ms per
frame at batch 1 and 8 (every run's FP32 graph timed in one process, interleaved), GFLOP per frame
and the training cost (epochs x median seconds per epoch). Levers (TrainConfig / train flags):
``synthetic`` (denoising student: synthetic defects pasted in, the clean image's teacher features
as the target), ``hard_fraction`` (EfficientAD's hard-feature loss), ``lr_schedule: cosine``,
``amp: bf16`` (CPU bfloat16 autocast, faster steps on CPUs with AVX-512 BF16).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hard_parts import VARIANTS, run_variants  # noqa: E402
from memory_speed import table  # noqa: E402  (one table for both references)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, action="append", default=[], help="MVTec category folder (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("runs/student_levers"))
    ap.add_argument("--variant", action="append", default=[], help=f"one of: {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--table", type=Path, help="time every finished run in this folder and print the table")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        print(table(args.table, args.iters, args.threads), end="")
        return
    run_variants(args.data, args.out, args.variant)


if __name__ == "__main__":
    main()
