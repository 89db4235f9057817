"""The memory reference at camera rate (issue 18): where its time goes, and every variant tried.

    python benchmarks/memory_speed.py --levels RUN/model.pt --threads 2         # per-level ONNX Runtime time of one memory model
    python benchmarks/memory_speed.py --data ../shared/data/mvtec/screw --out /work/exp/mem --variant a3-p211-16k   # train (resumable)
    python benchmarks/memory_speed.py --table /work/exp/mem --threads 2 --iters 30  # every run: ONNX export, ms/frame at batch 1 and 8, table

Training variants are ``stfpm-edge train`` with a few options changed (VARIANTS; a run folder that
holds ``metrics.json`` is reused). ``--table`` exports each finished run to a dynamic-batch FP32
ONNX graph (once) and times all of them in one process: runs of a few calls per graph (the first
untimed: as a camera calls one engine, its bank then sits in the caches), rounds in rotating
order, so drift hits every row alike; the absolute figures are only as quiet as the machine. GFLOP per frame is PyTorch's FLOP count of
the fused model (a multiply-add counts 2).

``--levels`` splits one model's ONNX Runtime time into the teacher and each level's search:
each part exported on its own (the same modules, the same memory rows) and timed interleaved.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hard_parts import COLUMNS, POSTS, run_variants  # noqa: E402  (the same resumable training driver)

MEM = dict(reference="memory", blur_sigma=4.0, memory_pool="1")  # explicit: the default changed to "auto" in issue 18
# name -> TrainConfig overrides. aN: neighbourhood of N x N features; pABC: per-level pooling; banks in rows per level
VARIANTS: dict[str, dict] = {
    "32k": dict(MEM, bank_size="32768"),  # the default before issue 18
    "16k": dict(MEM, bank_size="16384"),
    "p211-32k": dict(MEM, memory_pool="2,1,1", bank_size="32768"),
    "a3-32k": dict(MEM, memory_aggregate=3, bank_size="32768"),
    "a3-p211-16k": dict(MEM, memory_aggregate=3, memory_pool="2,1,1", bank_size="16384"),
    "a3-p221-16k": dict(MEM, memory_aggregate=3, memory_pool="2,2,1", bank_size="16384"),
    "a3-p221-32k": dict(MEM, memory_aggregate=3, memory_pool="2,2,1", bank_size="32768"),
    "a3-p211-8k-16k-16k": dict(MEM, memory_aggregate=3, memory_pool="2,1,1", bank_size="8192,16384,16384"),
    "p211-8k-16k-32k": dict(MEM, memory_pool="2,1,1", bank_size="8192,16384,32768"),
    "p211-16k": dict(MEM, memory_pool="2,1,1", bank_size="16384"),
    "p221-16k": dict(MEM, memory_pool="2,2,1", bank_size="16384"),
    "p221-32k": dict(MEM, memory_pool="2,2,1", bank_size="32768"),
    "p211-16k-16k-8k": dict(MEM, memory_pool="2,1,1", bank_size="16384,16384,8192"),
    "p421-32k": dict(MEM, memory_pool="4,2,1", bank_size="32768"),
    "p221-32k-32k-16k": dict(MEM, memory_pool="2,2,1", bank_size="32768,32768,16384"),
    "p221-16k-32k-32k": dict(MEM, memory_pool="2,2,1", bank_size="16384,32768,32768"),
    "p222-32k": dict(MEM, memory_pool="2,2,2", bank_size="32768"),
}

def export_run(run: Path) -> Path:
    """The run's FP32 graph with a free batch (exported once; checked for parity by `stfpm-edge export`, not here)."""
    from stfpm_edge.export.onnx_export import export_onnx

    onnx_path = run / "bench-dynamic.onnx"
    if not onnx_path.is_file():
        export_onnx(run / "model.pt", onnx_path, dynamic=True)
    return onnx_path


CONSECUTIVE = 5  # calls in a row per graph (the first untimed): a camera calls one engine, whose bank then sits in the caches


def time_graphs(paths: dict[str, Path], batches: tuple[int, ...], iters: int, threads: int) -> dict[str, dict[int, float]]:
    """Median ms per frame of each graph at each batch: runs of CONSECUTIVE calls per graph, rounds in rotating order."""
    from stfpm_edge.bench import schedule
    from stfpm_edge.engines import open_engine

    engines = {name: open_engine(p, threads=threads) for name, p in paths.items()}
    try:
        out: dict[str, dict[int, float]] = {name: {} for name in engines}
        for b in batches:
            frames = {}
            for name, e in engines.items():
                frames[name] = np.random.default_rng(0).integers(0, 256, (b, e.geometry.height, e.geometry.width, 3), dtype=np.uint8)
                e.infer(frames[name])  # warm-up
            times: dict[str, list[float]] = {name: [] for name in engines}
            for name, timed in schedule(list(engines), iters, 0, CONSECUTIVE):
                t0 = time.perf_counter()
                engines[name].infer(frames[name])
                if timed:
                    times[name].append(time.perf_counter() - t0)
            for name in engines:
                out[name][b] = 1000.0 * float(np.median(times[name])) / b
        return out
    finally:
        for e in engines.values():
            e.close()


def table(out_root: Path, iters: int, threads: int, batches=(1, 8)) -> str:
    """Every finished run in ``out_root``: accuracy, ONNX Runtime ms per frame (timed here, interleaved), GFLOP, training cost."""
    runs = {f.parent.name: f.parent for f in sorted(out_root.glob("*/metrics.json")) if (f.parent / "model.pt").is_file()}
    meta = {name: json.loads((run / "metrics.json").read_text()) for name, run in runs.items()}
    graphs = {name: export_run(run) for name, run in runs.items()}
    flops = {name: json.loads(Path(str(p) + ".json").read_text()).get("flops_per_frame") if Path(str(p) + ".json").is_file() else None
             for name, p in graphs.items()}
    ms = time_graphs(graphs, batches, iters, threads)
    fmt = lambda v, d=3: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    head = " | ".join(f"ms/frame b{b}" for b in batches)
    lines = [f"| run | image AUROC | pixel AUROC | pixel F1 | AUPRO@0.3 | image F1 @ thr | false alarms (test good) | misses @ thr | {head} "
             "| GFLOP/frame | training |", "|---|" + "---|" * (9 + len(batches))]
    for name, r in meta.items():
        mem = r.get("memory") or {}
        cells = [fmt(r.get(c)) for c in COLUMNS] + [fmt(r.get("miss_rate"))] + [fmt(ms[name][b], 1) for b in batches]
        if mem:
            cost = f"bank {fmt(mem.get('seconds'), 0)} s"
        else:
            cost = f"{r.get('epochs')} ep × {fmt(r.get('seconds_per_epoch'), 1)} s"
        cells += [fmt(flops[name] / 1e9 if flops[name] else None, 2), cost]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def level_times(checkpoint: Path, iters: int, threads: int, blocks: tuple[int, ...] = ()) -> list[dict]:
    """ONNX Runtime ms of the teacher and of each level's search, for one memory checkpoint (batch 1).

    ``blocks``: time each level's search with these ``MemoryBank.BLOCK`` values (similarities held
    at once) as well as the model's own, to show what the block size does.
    """
    import onnxruntime as ort
    import torch
    from torch import nn

    from stfpm_edge.checkpoint import load_checkpoint
    from stfpm_edge.export.onnx_export import OPSET, freeze_same_padding
    from stfpm_edge.model import MemoryBank, MemorySearch

    model, meta = load_checkpoint(checkpoint)
    if not isinstance(model.student, MemoryBank):
        raise SystemExit(f"{checkpoint}: not a memory model")
    model = model.to(memory_format=torch.contiguous_format).eval()
    geo = meta["geometry"]
    frames = torch.zeros(1, geo["height"], geo["width"], 3, dtype=torch.uint8)
    freeze_same_padding(model, frames)

    class Teacher(nn.Module):
        def forward(self, x):
            return tuple(model.teacher(model.normalize(x)))

    with torch.inference_mode():
        feats = Teacher()(frames)
    bank = model.student
    parts: dict[str, tuple[nn.Module, torch.Tensor]] = {"teacher": (Teacher(), frames)}
    rows = []
    class Level(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.distances([x])[0]

    for k, (f, b) in enumerate(zip(feats, bank.banks())):
        k_pool = bank.search.factor(k)
        queries = -(-f.shape[2] // k_pool) * -(-f.shape[3] // k_pool)
        for block in (MemoryBank.BLOCK, *[v for v in blocks if v != MemoryBank.BLOCK]):
            one = MemoryBank([b], MemorySearch(bank.search.aggregate, (k_pool,)))
            one.BLOCK = block
            chunk = max(64, min(4096, block // queries))
            name = f"level {k}" + ("" if block == MemoryBank.BLOCK else f", {chunk}-row blocks")
            parts[name] = (Level(one), f.contiguous())
            rows.append({"part": name, "stride": int(round(geo["height"] / f.shape[2])) * k_pool, "channels": f.shape[1],
                         "queries": queries, "rows": b.shape[0], "block_rows": chunk, "gflop": 2.0 * queries * b.shape[0] * f.shape[1] / 1e9})
    rows.insert(0, {"part": "teacher", "stride": None, "channels": 3, "queries": None, "rows": None, "block_rows": None, "gflop": None})
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (m, x) in parts.items():
            path = Path(tmp) / f"{name.replace(' ', '')}.onnx"
            torch.onnx.export(m, (x,), str(path), dynamo=False, opset_version=OPSET, input_names=["x"])
            s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            sessions[name] = (s, {"x": x.numpy()})
        times: dict[str, list[float]] = {name: [] for name in sessions}
        from stfpm_edge.bench import schedule

        for name, timed in schedule(list(sessions), iters, 0, CONSECUTIVE):
            s, feed = sessions[name]
            t0 = time.perf_counter()
            s.run(None, feed)
            if timed:
                times[name].append(time.perf_counter() - t0)
    for r in rows:
        r["ms"] = 1000.0 * float(np.median(times[r["part"]]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, action="append", default=[], help="MVTec category folder (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("runs/memory_speed"), help="folder for the run folders")
    ap.add_argument("--variant", action="append", default=[], help=f"training variants: {', '.join(VARIANTS)}; "
                    f"the map post-processing of a trained one changed: NAME+{'+'.join(POSTS)}")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime / torch threads")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--table", type=Path, help="time every finished run in this folder and print the table")
    ap.add_argument("--levels", type=Path, help="a memory model.pt: per-level ONNX Runtime time")
    ap.add_argument("--blocks", type=int, nargs="*", default=[], help="with --levels: also time each level with these MemoryBank.BLOCK values")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.levels:
        rows = level_times(args.levels, args.iters, args.threads, tuple(args.blocks))
        total = sum(r["ms"] for r in rows if "blocks" not in r["part"])  # the model's own parts
        print("| part | query stride | channels | queries | rows | rows per block | GFLOP | ms (batch 1) | share of the model's |\n"
              "|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            g = "—" if r["gflop"] is None else f"{r['gflop']:.2f}"
            print(f"| {r['part']} | {r['stride'] or '—'} | {r['channels']} | {r['queries'] or '—'} | {r['rows'] or '—'} | {r['block_rows'] or '—'} "
                  f"| {g} | {r['ms']:.1f} | {r['ms'] / total:.0%} |")
        return
    if args.table:
        print(table(args.table, args.iters, args.threads), end="")
        return
    run_variants(args.data, args.out, args.variant, VARIANTS)


if __name__ == "__main__":
    main()
