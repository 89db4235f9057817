"""How a student's test accuracy moves along one training, epoch by epoch (issue 17).

    python benchmarks/trajectory.py train --every 2 --start 50 -- --reference student --data DIR --out RUN [train flags]
    python benchmarks/trajectory.py branch RUN/snapshots/state0080.pt --out RUN2 --set lr_schedule=constant -- --threads 1
    python benchmarks/trajectory.py eval RUN [RUN ...] [--threads 1]

Trainings of one student setting end 0.83-0.92 image AUROC apart on screw, and one trajectory read at
epochs 60, 100 and 200 gave 0.870, 0.943 and 0.914: a single number at the last epoch cannot say
whether a lever raised the level or the run was lucky. ``train`` runs ``stfpm-edge train`` unchanged
and, after every ``--every``-th epoch from ``--start`` on, copies the student (its trained and its
averaged weights) from the run's resume state into ``RUN/snapshots/``; ``--keep-state E`` also keeps the
whole resume state after epoch E. ``branch`` continues such a state in a new run folder with some
settings changed (``--set key=value``), so two settings share one trajectory up to the epoch where
they differ (a run is deterministic on one machine and thread count: the same seed retraces it
exactly) at the cost of the epochs after it. ``eval`` scores each snapshot
on the test split with the run's own finished model.pt (teacher, standardisation, map post), once
with the averaged weights (what the run would keep) and once with the trained ones, and prints image
and pixel AUROC per epoch and their mean and spread over the window: the level and the noise of a
setting, from one training. The test images inform this reading only; nothing selects an epoch by
them (the tool keeps the lowest validation loss).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SNAPSHOTS = "snapshots"


def _averaged(average_state: dict | None) -> dict | None:
    """An AveragedModel's state -> the state of the module it averages (None when the run does not average)."""
    if not average_state:
        return None
    return {k[len("module."):]: v for k, v in average_state.items() if k.startswith("module.")}


def train(args: argparse.Namespace, train_args: list[str]) -> int:
    import torch

    from stfpm_edge.checkpoint import atomic_torch_save

    if "--out" not in train_args:
        sys.exit("trajectory.py train: give the run folder with --out after '--'")
    run = Path(train_args[train_args.index("--out") + 1])
    last = run / "last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "stfpm_edge.cli", "train", *train_args])
    seen = None
    try:
        while True:
            done = proc.poll() is not None
            try:
                stamp = last.stat().st_mtime_ns
            except FileNotFoundError:
                stamp = None
            if stamp is not None and stamp != seen:
                seen = stamp
                try:  # written atomically (rename), so a file that is there is whole
                    state = torch.load(last, map_location="cpu", weights_only=True)
                except (FileNotFoundError, RuntimeError, EOFError):
                    state = None  # replaced or removed while opening: the next round sees the new one
                if state is not None:
                    epoch = int(state["epoch"]) + 1
                    if epoch in args.keep_state:
                        (run / SNAPSHOTS).mkdir(exist_ok=True)
                        atomic_torch_save(run / SNAPSHOTS / f"state{epoch:04d}.pt", state)
                    if epoch >= args.start and (epoch - args.start) % args.every == 0:
                        target = run / SNAPSHOTS / f"epoch{epoch:04d}.pt"
                        if not target.exists():
                            target.parent.mkdir(exist_ok=True)
                            atomic_torch_save(target, {"epoch": epoch, "student": state["student"],
                                                       "average": _averaged(state.get("average")),
                                                       "history": state["history"][-1]})
            if done:
                return proc.returncode
            time.sleep(args.poll)
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def branch(args: argparse.Namespace, train_args: list[str]) -> int:
    """A kept resume state, continued in ``args.out`` with ``args.set`` changed: ``train --resume`` with snapshots."""
    import torch

    from stfpm_edge.checkpoint import atomic_torch_save
    from stfpm_edge.config import TrainConfig
    from stfpm_edge.fileio import atomic_write_json
    from stfpm_edge.train import lr_schedule

    state = torch.load(args.state, map_location="cpu", weights_only=True)
    known = TrainConfig().to_dict()
    kept_before = float(state["config"].get("average_epochs", 0.0)) > 0
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in known or key in ("data", "out"):
            sys.exit(f"trajectory.py branch: --set {item}: not a setting that may change here")
        state["config"][key] = type(known[key])(value) if known[key] is not None else value
    # the rate where the branch starts, as its own schedule has it after the epochs done (the optimiser's state holds the old one's)
    epochs, cfg = int(state["config"]["epochs"]), state["config"]
    param = torch.nn.Parameter(torch.zeros(1))
    probe = torch.optim.SGD([param], lr=float(cfg["lr"]))
    schedule = lr_schedule(probe, cfg["lr_schedule"], epochs)
    for _ in range(int(state["epoch"]) + 1):
        probe.step()
        if schedule is not None:
            schedule.step()
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = probe.param_groups[0]["lr"]
        group["initial_lr"] = float(cfg["lr"])
    state["schedule"] = schedule.state_dict() if schedule is not None else None
    if float(cfg.get("average_epochs", 0.0)) > 0 and not state.get("average"):
        sys.exit("trajectory.py branch: this state kept no weight average to continue; average_epochs must stay 0")
    if (float(cfg.get("average_epochs", 0.0)) > 0) != kept_before:
        # the kept student changes kind (averaged or trained weights): the best so far was the other kind's, so the branch
        # selects among its own epochs only
        state.update(best_loss=float("inf"), best_epoch=-1, best_student=None)
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"trajectory.py branch: {args.out} exists and is not empty")
    args.out.mkdir(parents=True, exist_ok=True)
    state["config"]["out"] = str(args.out)
    atomic_write_json(args.out / "config.json", state["config"])
    atomic_torch_save(args.out / "last.pt", state)
    return train(args, ["--resume", "--out", str(args.out), *train_args])


def _aurocs(test, maps: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Image and pixel AUROC by the protocol's pixel selection (metrics.pixel_pairs), without the slower AUPRO."""
    from sklearn.metrics import roc_auc_score

    from stfpm_edge.metrics import pixel_pairs

    pixels, truth, _ = pixel_pairs(maps, test.masks, test.has_mask, test.valid)
    return float(roc_auc_score(test.labels, scores)), float(roc_auc_score(truth, pixels))


def evaluate(args: argparse.Namespace) -> int:
    import torch

    from stfpm_edge.checkpoint import load_checkpoint
    from stfpm_edge.config import load_config
    from stfpm_edge.datasets import discover
    from stfpm_edge.engines.torch_engine import TorchEngine
    from stfpm_edge.evaluate import TestSet, predict

    torch.set_num_threads(args.threads)
    for run in args.runs:
        snaps = sorted((run / SNAPSHOTS).glob("epoch*.pt"))
        if not snaps:
            print(f"{run}: no snapshots (train it with 'trajectory.py train')")
            continue
        model, meta = load_checkpoint(run / "model.pt")
        cfg = load_config(None, meta["config"])
        engine = TorchEngine.from_model(model, meta)
        test = TestSet.load(discover(cfg.data, seed=cfg.seed).test, engine.geometry, progress=False)
        rows = []
        print(f"\n{run}\nepoch | val loss (kept) | image / pixel AUROC, averaged weights | image / pixel AUROC, trained weights")
        for path in snaps:
            snap = torch.load(path, map_location="cpu", weights_only=True)
            row = {"epoch": snap["epoch"], "val_loss": snap["history"].get("val_loss")}
            for name, state in (("averaged", snap["average"]), ("trained", snap["student"])):
                if state is None:
                    continue
                model.student.load_state_dict(state)
                model.eval()
                maps, scores = predict(engine.infer, test.images)
                row[name] = _aurocs(test, maps, scores)
            rows.append(row)
            cells = [f"{row[n][0]:.3f} / {row[n][1]:.4f}" if n in row else "-" for n in ("averaged", "trained")]
            print(f"{row['epoch']:5d} | {row['val_loss']:.4f} | {cells[0]} | {cells[1]}", flush=True)
        for name in ("averaged", "trained"):
            vals = np.array([r[name] for r in rows if name in r])
            if len(vals):
                print(f"{name}: image AUROC mean {vals[:, 0].mean():.3f} sd {vals[:, 0].std():.3f} "
                      f"(min {vals[:, 0].min():.3f}, max {vals[:, 0].max():.3f}); pixel mean {vals[:, 1].mean():.4f} "
                      f"sd {vals[:, 1].std():.4f} over epochs {rows[0]['epoch']}-{rows[-1]['epoch']}")
        (run / "trajectory.json").write_text(json.dumps(rows, indent=1))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="stfpm-edge train with snapshots of the student (its flags after '--')")
    b = sub.add_parser("branch", help="continue a kept state in a new run folder with settings changed (train flags after '--')")
    b.add_argument("state", type=Path, help="a state kept by 'train --keep-state'")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting of the branch (repeatable)")
    for p in (t, b):
        p.add_argument("--every", type=int, default=2, help="a snapshot after every N-th epoch")
        p.add_argument("--start", type=int, default=50, help="the first epoch snapshotted")
        p.add_argument("--poll", type=float, default=2.0, help="seconds between looks at the resume state")
        p.add_argument("--keep-state", type=int, action="append", default=[], help="keep the whole resume state after this epoch")
    e = sub.add_parser("eval", help="test image and pixel AUROC of every snapshot of finished runs")
    e.add_argument("runs", type=Path, nargs="+")
    e.add_argument("--threads", type=int, default=1)
    argv = sys.argv[1:]
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1 :]
    args = ap.parse_args(argv)
    sys.exit({"train": train, "branch": branch}[args.command](args, rest) if args.command != "eval" else evaluate(args))


if __name__ == "__main__":
    main()
