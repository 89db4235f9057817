"""One `stfpm-edge run`, start to end: check the model and its options, claim the run folder, open
the source, route SIGINT/SIGTERM to a clean stop, run area-scan or line-scan, and refuse to call a
run that inspected nothing a success (a supervisor must notice)."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..engines import engine_options, open_engine
from ..errors import StfpmError
from ..fileio import mask_secrets
from .control import make_control
from .linescan import LineScanOptions, run_linescan
from .outputs import RunFolder, check_video_path
from .pipeline import RunOptions, run_stream
from .sinks import make_sink
from .sources import open_source


def parse_recipes(models) -> dict:
    """``run``'s MODEL arguments -> {recipe name: model}. One plain model: {None: it} (records name no recipe). Several, or
    ``NAME=PATH``: one recipe each, named NAME or the file's stem; the first is active at the start."""
    models = [models] if isinstance(models, (str, Path)) else list(models)
    if not models:
        raise StfpmError("give at least one model")
    if len(models) == 1 and "=" not in _name_part(str(models[0])):
        return {None: models[0]}
    out: dict = {}
    for m in models:
        text = str(m)
        name = _name_part(text)
        if "=" in name:
            name, text = text.split("=", 1)
            name = name.strip()
        else:
            name = Path(text).stem if "://" not in text else text.rstrip("/").rsplit("/", 1)[-1]
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise StfpmError(f"recipe name {name!r} (from {mask_secrets(str(m))}): use letters, digits, '-', '_' or '.'")
        if name in out:
            raise StfpmError(f"two models are named {name!r}: give them names, e.g. {name}-a={mask_secrets(str(m))}")
        out[name] = text
    return out


def _name_part(text: str) -> str:
    """What could be a ``NAME=`` prefix: the text before any '/' or '://'."""
    return text.split("://", 1)[0].split("/", 1)[0]


@dataclass
class Session:
    model: Path | str | list  # one model, or several (recipes: see parse_recipes)
    source: str | list[str]  # several: one capture thread each, frames batched across them into one engine call
    out: Path | None = None
    engine: dict[str, Any] = field(default_factory=dict)  # backend options: threads, build_if_stale, zero_copy
    line_scan: LineScanOptions | None = None  # set: the source is a web arriving row block by row block
    area: RunOptions | None = None  # area-scan options (out_dir is filled in)
    sinks: list[str] = field(default_factory=list)  # --sink URLs: verdicts to MQTT, a Modbus coil, webhooks
    recipe_from: list[str] = field(default_factory=list)  # --recipe-from URLs: changeovers from MQTT or a PLC register
    trigger: str | None = None  # --trigger URL: the PLC handshake (a frame per trigger, the verdict answered)


def default_out() -> Path:
    return Path("runs") / f"inspect-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def run_session(s: Session, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run it; returns (run folder, summary). Raises ``StfpmError`` when nothing was inspected."""
    recipes = parse_recipes(s.model)
    for model in recipes.values():
        engine_options(model, **s.engine)  # a missing file or an option the backend does not take: before the source opens
    if len(recipes) > 1 and s.line_scan is not None:
        raise StfpmError("--line-scan takes one model (one web)")
    out = Path(s.out) if s.out else default_out()
    area = s.area or RunOptions(out)
    area.out_dir = out
    if area.save_video is not None:
        check_video_path(area.save_video)
    sinks = [make_sink(url) for url in s.sinks]  # every URL and its options checked before anything connects
    if s.recipe_from and None in recipes:
        raise StfpmError("--recipe-from switches between recipes: give run several models (or NAME=PATH)")
    if s.recipe_from and s.line_scan is not None:
        raise StfpmError("--recipe-from: a line-scan run has one model")
    area.controls = [make_control(url) for url in s.recipe_from]
    if s.trigger is not None:
        if s.line_scan is not None:
            raise StfpmError("--trigger inspects a frame per trigger; a line-scan web is inspected as it passes")
        from .handshake import PlcHandshake

        area.trigger = PlcHandshake(s.trigger)
    for sink in sinks:  # what every message and the MQTT status say the verdicts come from
        sink.context["model"] = mask_secrets(", ".join(str(m) if n is None else f"{n}={m}" for n, m in recipes.items()))
    if area.ui and s.line_scan is not None:
        raise StfpmError("--ui shows area-scan runs; a line-scan run reports through tiles.jsonl, its heat strip and --sink")
    if area.ui:
        from .station import check_ui

        check_ui(area.ui, area.ui_token)
    if s.line_scan is not None:
        s.line_scan.sinks = sinks
    else:
        area.sinks = sinks
    specs = [s.source] if isinstance(s.source, str) else list(s.source)
    if not specs:
        raise StfpmError("give at least one --source")
    if len(specs) > 1 and s.line_scan is not None:
        raise StfpmError("--line-scan takes one source (one web)")
    area.check_sources(len(specs))
    srcs = []
    try:
        for spec in specs:
            srcs.append(open_source(spec))
        folder = RunFolder(out).__enter__()  # refuses a folder with another run's results, locks it for this run
    except BaseException:
        for src in srcs:
            src.close()
        raise
    src = srcs[0] if len(srcs) == 1 else srcs
    stop, interrupted = threading.Event(), threading.Event()

    def on_signal(*_):
        interrupted.set()
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    factories = {name: (lambda m=model: open_engine(m, **s.engine)) for name, model in recipes.items()}  # opened inside the inference thread
    factory = factories[None] if None in factories else factories
    try:
        if s.line_scan is not None:
            s.line_scan.out_dir = out
            summary = run_linescan(next(iter(factories.values())), src, s.line_scan, stop)
        else:
            summary = run_stream(factory, src, area, stop, progress=progress)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        folder.__exit__()
    inspected = summary.get("tiles_inspected", summary.get("frames_inspected", 0))
    if not inspected and not interrupted.is_set():
        read = summary.get("chunks_read", summary.get("frames_read", 0))
        failed = summary.get("frames_failed", summary.get("chunks_failed", 0))
        raise StfpmError(f"nothing was inspected: {read} frame(s) read, {failed} failed "
                         f"(see {out / 'summary.json'}; a --roi outside the frame or a source that never delivered?)")
    return out, summary
