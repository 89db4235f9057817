"""What a GPU without TensorRT can tell: the fused PyTorch model in FP16 against FP32, latency at
several batch sizes with and without CUDA graphs, and training speed with and without AMP.

    python benchmarks/torch_gpu.py --model runs/bottle/model.pt --data ../shared/data/mvtec/bottle --json out.json
    python benchmarks/torch_gpu.py --model M --data D --device cpu --batches 1 --iters 3   # smoke test of the logic

FP16 fidelity: max |map difference| relative to the map range, max relative score difference and
verdict flips at the model's threshold on the test images. Latency: median of ``--iters`` timed
calls after warm-up, synchronised, per frame. CUDA graphs replay one captured forward pass on
static buffers (removes the launch overhead that dominates small batches). Training: seconds per
epoch over ``--train-epochs`` epochs of the paper's recipe, FP32 versus AMP (the ``amp`` option).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms(fn, x: torch.Tensor, iters: int, device: torch.device) -> float:
    for _ in range(3):
        fn(x)
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def graphed(model, example: torch.Tensor):
    """A CUDA-graph replay of ``model`` for inputs shaped like ``example``."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            model(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_out = model(static_in)

    def run(x):
        static_in.copy_(x)
        graph.replay()
        return static_out

    return run


def table(results: dict[str, Path]) -> str:
    """One Markdown table of ms per frame, reference by precision by batch, from the --json files of earlier runs."""
    lines = ["| reference | precision | batch | eager ms / frame | CUDA graph ms / frame | frames / s (graph) |", "|---|---|---|---|---|---|"]
    for name, path in results.items():
        if not path.is_file():
            lines.append(f"| {name} | — | — | not measured ({path} missing) | — | — |")
            continue
        for r in json.loads(path.read_text())["latency"]:
            g = r.get("cuda_graph_ms_per_frame")
            lines.append(f"| {name} | {r['precision']} | {r['batch']} | {r['eager_ms_per_frame']:.2f} | "
                         + ("—" if g is None else f"{g:.2f}") + " | " + ("—" if g is None else f"{1000.0 / g:.0f}") + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", nargs="+", metavar="NAME=JSON", help="print the table of earlier --json results (e.g. memory=a.json student=b.json) and exit")
    ap.add_argument("--model", type=Path, help="model.pt")
    ap.add_argument("--data", type=Path, help="MVTec category (test images for fidelity, train images for speed)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--train-epochs", type=int, default=2, help="0 skips the training comparison")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.table:
        print(table({k: Path(v) for k, v in (item.split("=", 1) for item in args.table)}))
        return
    if args.model is None or args.data is None:
        ap.error("--model and --data are needed (or --table)")

    from stfpm_edge.checkpoint import load_checkpoint
    from stfpm_edge.config import load_config
    from stfpm_edge.datasets import discover, load_images
    from stfpm_edge.scoring import is_anomalous
    from stfpm_edge.train import train

    device = torch.device(args.device)
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    model, meta = load_checkpoint(args.model)
    model = model.to(device).eval()
    geo, thr = meta["geometry"], meta["threshold"]["image"]
    ds = discover(args.data, seed=(meta.get("config") or {}).get("seed", 0))
    from stfpm_edge.geometry import Geometry

    frames, _ = load_images(ds.test, Geometry(**geo))
    x_all = torch.from_numpy(frames).to(device)

    # FP16 fidelity: backbones in half precision, head in FP32 (what STFPM.forward does for a half model)
    import copy

    half = copy.deepcopy(model).half_backbones()
    with torch.inference_mode():
        m32, s32 = zip(*[model(x_all[i : i + 16]) for i in range(0, len(x_all), 16)])
        m16, s16 = zip(*[half(x_all[i : i + 16]) for i in range(0, len(x_all), 16)])
    m32, s32, m16, s16 = (torch.cat(t).float().cpu().numpy() for t in (m32, s32, m16, s16))
    span = float(m32.max() - m32.min())
    out["fp16_vs_fp32"] = {"images": len(frames), "max_abs_map_diff": float(np.abs(m16 - m32).max()), "map_range": span,
                           "max_rel_score_diff": float((np.abs(s16 - s32) / np.maximum(np.abs(s32), 1e-12)).max()),
                           "verdict_flips": int((is_anomalous(s16, thr) != is_anomalous(s32, thr)).sum())}
    print(json.dumps(out["fp16_vs_fp32"]), flush=True)

    # latency per frame at each batch size: FP32 / FP16, eager / CUDA graph
    rows = []
    for b in [int(v) for v in args.batches.split(",")]:
        x = x_all[:1].repeat(b, 1, 1, 1)
        for name, m in (("fp32", model), ("fp16", half)):
            with torch.inference_mode():
                eager = latency_ms(m, x, args.iters, device)
            row = {"batch": b, "precision": name, "eager_ms_per_frame": eager / b}
            if device.type == "cuda":
                row["cuda_graph_ms_per_frame"] = latency_ms(graphed(m, x), x, args.iters, device) / b
                row["graph_speedup"] = eager / (row["cuda_graph_ms_per_frame"] * b)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out["latency"] = rows

    # training speed, FP32 versus AMP
    import tempfile

    out["training"] = {}
    for amp in ("off", "auto") if args.train_epochs > 0 else ():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(None, dict(data=str(args.data), out=str(Path(tmp) / amp), epochs=args.train_epochs, overlays=0,
                                         reference="student", device=args.device, amp=amp, height=geo["height"], width=geo["width"]))
            t0 = time.time()
            _, m = train(cfg, progress=False)
            out["training"][amp] = {"seconds_per_epoch": m["seconds_per_epoch"], "run_s": time.time() - t0,
                                    "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"]}
            print(amp, json.dumps(out["training"][amp]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
