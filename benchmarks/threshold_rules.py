"""Threshold rules compared on trained runs: misses and false calls on the test set, and the threshold's spread over seeds.

    python benchmarks/threshold_rules.py RUN [RUN ...] [--rates 0.001 0.005 0.01] [--markdown]

Each RUN is a folder written by ``stfpm-edge train`` (model.pt, scores.csv). Every rule sees only
the good-image scores the checkpoint carries (``normal_stats.heldout_scores``: out-of-fold scores of
good images the reference did not learn, ``heldout_sources`` saying which), never a test image:

- ``before``: the rule of earlier versions, the 0.99 quantile of the held-out splits alone (a
  student's calibration split; a memory's validation and calibration splits);
- ``quantile@R``: the empirical quantile at 1 - R of all out-of-fold scores;
- ``tail@R``: the generalised Pareto tail fit (``thresholds.threshold_for``, what ``fit_threshold`` sets) at false-call rate R.

Runs are grouped by category and reference; a group's line gives the mean misses and false calls
over its runs (each run's counts in brackets) and the threshold's spread over them (max / min).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np


def load_run(run: Path) -> dict:
    from stfpm_edge.checkpoint import read_checkpoint

    meta = read_checkpoint(run / "model.pt")["meta"]
    stats = meta["normal_stats"]
    with open(run / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    sources = stats.get("heldout_sources") or [["held out", len(stats["heldout_scores"])]]
    reference = (meta.get("config") or {}).get("reference", "student")
    # the splits the earlier rule used: a student's first source (calibration), a memory's held-out splits
    split_names = ("calibration",) if reference == "student" else ("calibration", "validation")
    n_split = 0
    for name, n in sources:
        if name not in split_names:
            break
        n_split += n
    return {"category": meta["dataset"]["name"], "reference": reference, "seed": meta["config"].get("seed"),
            "good": np.asarray(stats["heldout_scores"], dtype=np.float64), "n_split": n_split or len(stats["heldout_scores"]),
            "labels": labels, "scores": scores, "sources": sources}


def rule_thresholds(run: dict, rates: list[float]) -> dict[str, float]:
    from stfpm_edge.thresholds import threshold_for  # the point value alone: no bootstrap range is needed here

    out = {"before": float(np.quantile(run["good"][: run["n_split"]], 0.99))}
    for rate in rates:
        out[f"quantile@{rate:g}"] = threshold_for(run["good"], "quantile", rate)
        out[f"tail@{rate:g}"] = threshold_for(run["good"], "tail", rate)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.001, 0.005, 0.01])
    ap.add_argument("--markdown", action="store_true", help="one Markdown table")
    args = ap.parse_args()
    groups: dict[tuple, list] = defaultdict(list)
    for run in args.runs:
        r = load_run(run)
        groups[(r["category"], r["reference"])].append(r)
    if args.markdown:
        print("| data | reference | rule | misses (mean, per seed) | false calls on test good (per seed) | threshold max / min over seeds |")
        print("|---|---|---|---|---|---|")
    for (category, reference), runs in sorted(groups.items()):
        n_good, n_bad = int((runs[0]["labels"] == 0).sum()), int((runs[0]["labels"] == 1).sum())
        if not args.markdown:
            print(f"{category} / {reference}: {len(runs)} runs; test {n_good} good, {n_bad} defective; out-of-fold good scores "
                  f"{len(runs[0]['good'])} ({', '.join(f'{n} {name}' for name, n in runs[0]['sources'])})")
        per_rule: dict[str, list] = defaultdict(list)
        for r in sorted(runs, key=lambda r: r["seed"] or 0):
            for name, thr in rule_thresholds(r, args.rates).items():
                flagged = r["scores"] > thr
                per_rule[name].append((thr, int(flagged[r["labels"] == 0].sum()), int((~flagged[r["labels"] == 1]).sum())))
        for name, vals in per_rule.items():
            thr = np.array([v[0] for v in vals])
            misses = [v[2] for v in vals]
            fa = [v[1] for v in vals]
            miss_pct = 100.0 * np.mean(misses) / max(1, n_bad)
            each = " / ".join(f"{100.0 * m / max(1, n_bad):.0f}" for m in misses)
            spread = thr.max() / thr.min() if thr.min() > 0 else float("nan")
            if args.markdown:
                print(f"| {category} | {reference} | {name} | {miss_pct:.0f} % ({each}) | {' / '.join(map(str, fa))} of {n_good} | {spread:.2f} |")
            else:
                print(f"  {name:>15}: misses {miss_pct:5.1f} % ({each}), false calls {' / '.join(map(str, fa))} of {n_good}, "
                      f"threshold spread {spread:.2f}")


if __name__ == "__main__":
    main()
