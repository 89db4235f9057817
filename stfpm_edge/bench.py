"""Latency and throughput, per stage, backend against backend (``stfpm-edge bench``).

Stages per batch of camera frames:
  preprocess   source frames -> model input (resize; the reference also normalises in NumPy)
  inference    model input -> anomaly maps and scores
  postprocess  normalised score, verdict, and the map resized back onto the source frame
Backends run in blocks of ``consecutive`` calls (the CLI's default 10; the first call of each block
untimed), blocks in rotating order, so that drift on a noisy machine hits all of them alike and every
timed call finds its own model in the caches, as a camera loop calling one engine frame after frame
does (call by call, a memory model's bank of tens of MB is evicted by the model beside it). Ratios
are taken against the PyTorch reference (two networks, then the map in Python, the way reference
implementations run STFPM).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import BackendUnavailable, StfpmError
from .geometry import Geometry
from .scoring import is_anomalous, normalized_score
from .timing import percentiles  # noqa: F401  (part of the benchmark's API)

STAGES = ("preprocess", "inference", "postprocess")


def interleaved_order(names: list[str], iteration: int) -> list[str]:
    """Rotate the backend order each iteration: every backend runs first, second, ... equally often."""
    k = iteration % len(names) if names else 0
    return names[k:] + names[:k]


@dataclass
class Backend:
    name: str
    geometry: Geometry
    threshold: float
    preprocess: Callable[[list[np.ndarray]], Any]
    infer: Callable[[Any], tuple[np.ndarray, np.ndarray]]
    flops_per_frame: float | None = None
    close: Callable[[], None] = lambda: None
    info: dict[str, Any] = field(default_factory=dict)
    device_timings: Callable[[], dict[str, float]] = dict  # GPU engines: CUDA-event times of the last call

    def postprocess(self, maps: np.ndarray, scores: np.ndarray, src_shape: tuple[int, int]):
        norm = normalized_score(scores, self.threshold)
        verdicts = is_anomalous(scores, self.threshold)
        full = [self.geometry.unfit_map(m, *src_shape) for m in maps]
        return norm, verdicts, full


def _fit_batch(geometry: Geometry, frames: list[np.ndarray]) -> np.ndarray:
    return np.stack([geometry.fit_image(f)[0] for f in frames])


def _has_student(path: Path) -> bool:
    from .checkpoint import read_checkpoint

    return "student" in read_checkpoint(path)


def reference_backend(path: Path, threads: int) -> Backend:
    """Two networks, then the anomaly map in Python: how reference implementations run STFPM."""
    import torch
    import torch.nn.functional as F

    from .checkpoint import load_checkpoint
    from .model import flops_per_frame

    if threads > 0:
        torch.set_num_threads(threads)
    model, meta = load_checkpoint(path)
    model = model.to(memory_format=torch.contiguous_format).eval()
    geo = Geometry(**meta["geometry"])
    mean = np.array(meta["normalization"]["mean"], np.float32)
    std = np.array(meta["normalization"]["std"], np.float32)

    def preprocess(frames):
        out = []
        for f in frames:
            rgb = geo.fit_image(f)[0][:, :, ::-1].astype(np.float32) / 255.0
            out.append(((rgb - mean) / std).transpose(2, 0, 1))
        return torch.from_numpy(np.ascontiguousarray(np.stack(out)))

    def infer(x):
        with torch.no_grad():
            t_feats = model.teacher(x)
            s_feats = model.student(x)
            amap = torch.ones(x.shape[0], 1, geo.height, geo.width)
            for t, s in zip(t_feats, s_feats):
                d = 0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2
                amap = amap * F.interpolate(d.sum(1, keepdim=True), size=(geo.height, geo.width), mode="bilinear", align_corners=False)
            maps = amap[:, 0].numpy()
        return maps, maps.reshape(len(maps), -1).max(axis=1)  # the raw map and the paper's max: no post-processing

    return Backend("torch-reference", geo, meta["threshold"]["image"], preprocess, infer, flops_per_frame(model, geo.height, geo.width),
                   info={"file": str(path), "engine": "torch-reference", "reference": "student"})


def engine_backend(path: Path, threads: int, name: str | None = None) -> Backend:
    from .engines import open_engine

    engine = open_engine(path, threads=threads)
    meta = engine.meta
    if name is None:
        precision = meta.get("precision", "fp32")
        target = (meta.get("int8") or {}).get("target")
        kind = (f"triton-{engine.scheme}" + ("-shm" if engine.shm else "")) if engine.name == "triton" else engine.name  # clients apart
        name = f"{kind}-{precision}" + (f"-{target}" if target else "")
    flops = meta.get("flops_per_frame")
    if flops is None and engine.name == "torch":
        from .model import flops_per_frame

        flops = flops_per_frame(engine.model, engine.geometry.height, engine.geometry.width)
    geo = engine.geometry
    return Backend(name, geo, engine.threshold, lambda frames: _fit_batch(geo, frames), engine.infer, flops, engine.close,
                   {"file": str(path), "engine": engine.name, "reference": (meta.get("config") or {}).get("reference", "student"),
                    "meta": meta}, engine.device_timings)


STUDENT_TWIN = "student-same-size"


def student_twin(meta: dict[str, Any], folder: Path, threads: int) -> Backend:
    """ONNX Runtime on the student pair a memory model would otherwise be: same teacher, levels, size and map post.

    Its weights are random (a trained student costs exactly the same): the row says what the
    paper's reference would cost on this machine, next to the memory, for the same data.
    """
    from .checkpoint import save_checkpoint
    from .export.onnx_export import export_onnx
    from .model import STFPM, MapPost

    model = STFPM.build(meta["backbone"], pretrained=False, layers=meta.get("layers"), post=MapPost(**meta.get("map_post", {})))
    keep = {k: v for k, v in meta.items() if k not in ("memory_search", "metrics", "source_checkpoint", "format", "precision", "batch")}
    keep["config"] = {**(meta.get("config") or {}), "reference": "student"}
    save_checkpoint(folder / "student.pt", model.eval(), keep)
    export_onnx(folder / "student.pt", folder / "student.onnx")
    return engine_backend(folder / "student.onnx", threads, STUDENT_TWIN)


def open_backends(models: list[Path], wanted: list[str] | None, threads: int, twin_folder: Path | None = None) -> list[Backend]:
    """A backend per model (two for a student .pt: the reference and the fused model); with ``twin_folder``,
    a memory model among students-less models also gets ``student_twin`` for comparison."""
    backends: list[Backend] = []
    from .engines.base import is_served

    for path in models:
        path = Path(path)
        if not is_served(path) and not path.is_file():
            raise StfpmError(f"{path}: model file not found")
        suffix = path.suffix.lower()
        if suffix == ".pt":
            if _has_student(path):  # the two-network reference is how papers run a student; a memory bank has none
                backends.append(reference_backend(path, threads))
            backends.append(engine_backend(path, threads, "torch-fused"))
        else:
            backends.append(engine_backend(path, threads))
    _tell_apart(backends)
    if wanted:
        names = [b.name for b in backends]
        missing = [w for w in wanted if not any(n == w or n.startswith(w) for n in names)]
        if missing:
            raise BackendUnavailable(f"backend(s) {', '.join(missing)} not available from the given models; available: {', '.join(names)}")
        backends = [b for b in backends if any(b.name == w or b.name.startswith(w) for w in wanted)]
    memories = [b for b in backends if b.info.get("reference") == "memory"]
    if twin_folder is not None and memories and not any(b.info.get("reference") == "student" for b in backends):
        backends.append(student_twin(memories[0].info["meta"], twin_folder, threads))
    geos = {(b.geometry.height, b.geometry.width) for b in backends}
    if len(geos) > 1:
        raise StfpmError(f"models have different input sizes {sorted(geos)}; compare models of one size")
    return backends


def _tell_apart(backends: list[Backend]) -> None:
    """Two models of one kind get their file's name in brackets, with as many parent folders as it takes to tell them
    apart (runs/a/model.onnx and runs/b/model.onnx: a/model.onnx, b/model.onnx); a file given twice gets #2, #3."""
    groups: dict[str, list[Backend]] = {}
    for b in backends:
        groups.setdefault(b.name, []).append(b)
    for kind, group in groups.items():
        if len(group) < 2:
            continue
        parts = [Path(b.info["file"]).parts if "file" in b.info else () for b in group]
        files, depth = set(parts), 1
        while depth < max(len(p) for p in files) and len({p[-depth:] for p in files}) < len(files):
            depth += 1
        labels = ["/".join(p[-depth:]) for p in parts]
        for i, (b, label) in enumerate(zip(group, labels)):
            repeat = labels[:i].count(label)
            b.name = f"{kind}[{label}{f' #{repeat + 1}' if repeat else ''}]"


def schedule(names: list[str], iters: int, warmup: int, consecutive: int = 1) -> list[tuple[str, bool]]:
    """The order of calls: (backend, timed). ``consecutive`` = 1 alternates backends call by call; N > 1
    gives each backend runs of N calls in a row (as a camera loop calls one engine), the first call of
    each run untimed (its caches were another backend's), rounds rotating the order. ``warmup`` untimed
    calls per backend first (whole rounds: with runs of N calls, warmup / N rounds rounded up); each
    backend is timed ``iters`` times either way."""
    out: list[tuple[str, bool]] = []
    per_run = consecutive - 1 if consecutive > 1 else 1
    warmup = -(-warmup // consecutive) if consecutive > 1 else warmup
    rounds = warmup + -(-iters // per_run)
    timed = {n: 0 for n in names}
    for r in range(rounds):
        for name in interleaved_order(names, r):
            for j in range(consecutive):
                is_timed = r >= warmup and (consecutive == 1 or j > 0) and timed[name] < iters
                timed[name] += is_timed
                out.append((name, is_timed))
    return out


def run_benchmark(backends: list[Backend], frames: list[np.ndarray], batch_sizes: list[int], iters: int, warmup: int, progress: bool = True,
                  consecutive: int = 1) -> dict[str, Any]:
    """Per-stage timing in the order ``schedule`` gives. Returns per backend and batch size: stage stats, total, FPS, ratios."""
    from tqdm import tqdm

    results: dict[str, Any] = {"batches": {}, "consecutive": consecutive}
    src_shape = frames[0].shape[:2]
    by_name = {b.name: b for b in backends}
    names = list(by_name)
    for bs in batch_sizes:
        batch = [frames[i % len(frames)] for i in range(bs)]
        samples = {n: {s: [] for s in (*STAGES, "total")} for n in names}
        for name, timed in tqdm(schedule(names, iters, warmup, consecutive), desc=f"batch {bs}", unit="call", disable=not progress, leave=False):
            b = by_name[name]
            t0 = time.perf_counter()
            x = b.preprocess(batch)
            t1 = time.perf_counter()
            maps, scores = b.infer(x)
            t2 = time.perf_counter()
            b.postprocess(maps, scores, src_shape)
            t3 = time.perf_counter()
            if timed:
                for stage, dt in zip((*STAGES, "total"), (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                    samples[name][stage].append(dt * 1e3)
                for stage, ms in b.device_timings().items():  # GPU: host-to-device, compute, device-to-host
                    samples[name].setdefault(f"gpu_{stage}", []).append(ms)
        table = {}
        for name in names:
            st = {s: percentiles(v) for s, v in samples[name].items()}
            fps = bs * len(samples[name]["total"]) / (sum(samples[name]["total"]) / 1e3)
            flops = by_name[name].flops_per_frame
            entry = {"stages": st, "fps": fps, "latency_ms_per_frame_p50": st["total"]["p50"] / bs, "raw_total_ms": samples[name]["total"]}
            if flops:
                entry["gflops_per_s"] = flops * bs / (st["inference"]["p50"] / 1e3) / 1e9
            entry["reference"] = by_name[name].info.get("reference")  # student or memory: what vs_student_lines compares
            table[name] = entry
        ref = table.get("torch-reference")
        for entry in table.values():
            entry["speedup_vs_reference"] = entry["fps"] / ref["fps"] if ref else None
        results["batches"][str(bs)] = table
    results["flops_per_frame"] = {b.name: b.flops_per_frame for b in backends}
    return results


def cpu_peak_gflops() -> dict[str, Any]:
    """Theoretical FP32 peak of the cores we may use: cores x clock x FLOPs per cycle (from ISA flags)."""
    info = {"model": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    flags, mhz, vendor = set(), None, ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                info["model"] = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key == "cpu MHz" and mhz is None:
                mhz = float(value)
            elif key == "vendor_id":
                vendor = value.strip()
    except OSError:
        pass
    if "avx512f" in flags:
        # Intel server cores: two 512-bit FMA units (64 FLOP/cycle); AMD Zen 4 runs AVX-512 on
        # 256-bit units (32 FLOP/cycle)
        per_cycle = 32 if vendor == "AuthenticAMD" else 64
    elif "avx2" in flags and "fma" in flags:
        per_cycle = 32
    elif "avx" in flags:
        per_cycle = 16
    else:
        per_cycle = 8
    info.update({"vendor": vendor, "mhz": mhz, "fp32_flops_per_cycle_per_core": per_cycle})
    if mhz:
        info["peak_gflops"] = info["cores"] * mhz * 1e6 * per_cycle / 1e9
        info["derivation"] = f"{info['cores']} cores x {mhz:.0f} MHz x {per_cycle} FP32 FLOP/cycle (FMA width from the CPU flags)"
    return info


def machine_info(threads: int) -> dict[str, Any]:
    import sys

    info: dict[str, Any] = {"cpu": cpu_peak_gflops(), "threads": threads, "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("onnxruntime", "torch", "tensorrt"):
        if mod in sys.modules:
            info[f"{mod}_version"] = getattr(sys.modules[mod], "__version__", "?")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timing_note(results: dict[str, Any]) -> str:
    """How the figures above were timed, in one line (the output says it, so nobody reads a ratio without knowing)."""
    n = int(results.get("consecutive") or 1)
    if n <= 1:
        return ("timed call by call, backends alternating: each call may find its caches filled by another backend "
                "(a memory model then reads slower than alone; --consecutive 10 times blocks)")
    return (f"timed in blocks of {n} calls per backend (the first of each block untimed, so every timed call has its own model "
            "in the caches, as in a camera loop), blocks in rotating order against drift")


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| backend | batch | preprocess p50 ms | inference p50 / p99 ms | postprocess p50 ms | total p50 / p99 ms | frames/s | x reference | GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for bs, table in results["batches"].items():
        for name, e in table.items():
            st = e["stages"]
            ratio = f"{e['speedup_vs_reference']:.2f}" if e.get("speedup_vs_reference") else ""
            gf = f"{e['gflops_per_s']:.1f}" if e.get("gflops_per_s") else ""
            lines.append(f"| {name} | {bs} | {st['preprocess']['p50']:.2f} | {st['inference']['p50']:.2f} / {st['inference']['p99']:.2f} | "
                         f"{st['postprocess']['p50']:.2f} | {st['total']['p50']:.2f} / {st['total']['p99']:.2f} | {e['fps']:.1f} | {ratio} | {gf} |")
    return "\n".join(lines) + "\n"


def histogram_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_path

    batches = list(results["batches"])
    fig, axes = plt.subplots(len(batches), 1, figsize=(7, 3 * len(batches)), dpi=110, squeeze=False)
    for ax, bs in zip(axes[:, 0], batches):
        for name, e in results["batches"][bs].items():
            ax.hist(e["raw_total_ms"], bins=40, alpha=0.55, label=f"{name} (p50 {e['stages']['total']['p50']:.1f} ms)")
        ax.set(xlabel="latency per batch, ms (preprocess + inference + postprocess)", ylabel="count", title=f"batch {bs}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def benchmark_models(models: list[Path], wanted: list[str] | None, batch_sizes: list[int], iters: int, warmup: int,
                     threads: int = 0, image: Path | None = None, progress: bool = True, vs_student: bool = True,
                     consecutive: int = 1) -> dict[str, Any]:
    """Open every backend the models give, benchmark them interleaved on one source frame, describe the machine.

    ``vs_student``: a memory model benchmarked without a student also gets ``student_twin``, so
    the table shows what each reference costs for the same data.

    The frame is ``image`` (any size; decoding and resizing are part of the preprocess stage) or a
    generated texture at model size. Returns the results with a ``markdown`` table.
    """
    from .geometry import decode_image

    if not batch_sizes or min(batch_sizes) < 1 or iters < 1 or warmup < 0:
        raise StfpmError("batch sizes and --iters must be at least 1")
    import tempfile

    twin_dir = tempfile.TemporaryDirectory(prefix="stfpm-bench-") if vs_student else None
    try:
        backends = open_backends(models, wanted, threads, Path(twin_dir.name) if twin_dir else None)
    except BaseException:
        if twin_dir:
            twin_dir.cleanup()
        raise
    try:
        geo = backends[0].geometry
        if image is not None:
            frame = decode_image(image)
        else:
            from .synthetic import texture

            frame = texture(np.random.default_rng(0), geo.height, geo.width)
        results = run_benchmark(backends, [frame], batch_sizes, iters, warmup, progress, consecutive)
    finally:
        for b in backends:
            b.close()
        if twin_dir:
            twin_dir.cleanup()
    results["machine"] = machine_info(threads)
    results["setup"] = {"models": [str(m) for m in models], "source_frame": list(frame.shape), "model_size": [geo.height, geo.width], "iters": iters, "warmup": warmup,
                        "consecutive": consecutive}
    results["markdown"] = markdown_table(results)
    return results


def vs_student_lines(results: dict[str, Any]) -> list[str]:
    """'NAME: X ms per frame = R x the student pair (BASE, Y ms)' for every memory model, when a student row is there.

    Rows are told apart by the reference their model holds, not by file names. A memory row is
    compared with a student row of its own kind (engine and precision: ``onnxruntime-fp32`` with
    ``onnxruntime-fp32[...]``), else with the student pair timed for it (``student_twin``), else
    with the first student row, which the line names.
    """
    lines = []
    for bs, table in results["batches"].items():
        students = [n for n, e in table.items() if e.get("reference") == "student"]
        for name, e in table.items():
            if e.get("reference") != "memory":
                continue
            kind = name.split("[")[0]
            base = next((n for n in students if n.split("[")[0] == kind), STUDENT_TWIN if STUDENT_TWIN in table else None)
            base = base or (students[0] if students else None)
            if base is None:
                continue
            ms, base_ms = e["latency_ms_per_frame_p50"], table[base]["latency_ms_per_frame_p50"]
            lines.append(f"batch {bs}: {name} {ms:.1f} ms per frame = {ms / base_ms:.2f}x the student pair of the same size ({base}, {base_ms:.1f} ms)")
    return lines


def peak_share_line(results: dict[str, Any]) -> str | None:
    """'fastest backend reaches X GFLOP/s = Y% of the CPU's FP32 peak', when both are known."""
    cpu = results["machine"]["cpu"]
    best = max((e for t in results["batches"].values() for e in t.values() if e.get("gflops_per_s")), key=lambda e: e["gflops_per_s"], default=None)
    if not best or not cpu.get("peak_gflops"):
        return None
    return (f"fastest backend reaches {best['gflops_per_s']:.1f} GFLOP/s = {100 * best['gflops_per_s'] / cpu['peak_gflops']:.1f}% of the CPU's FP32 peak "
            f"({cpu['peak_gflops']:.0f} GFLOP/s: {cpu['derivation']})")
