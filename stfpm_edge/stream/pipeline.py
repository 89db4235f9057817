"""The inspection loop: a capture thread, an inference thread that owns the engine, an output thread.

Live sources keep only the newest frame (stale frames are dropped and counted, so latency stays
bounded); files and folders hand over every frame in order. Every frame read ends up as exactly
one JSONL record: inspected or failed. Each record is flushed when written, so a crash leaves a
valid JSONL file up to the last frame; Ctrl-C / SIGTERM drain the pipeline before returning.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import StfpmError
from ..fileio import atomic_write_json, mask_secrets
from ..scoring import ANOMALOUS
from .capture import END, Capture, Mux, Reconnect, handover_for
from .counters import Counters, merged, summarize
from .inspection import Inspector
from .outputs import AnomalyFiles, JsonlWriter, Output, Picture, VideoOutput, Window, frame_record
from .sources import Source


@dataclass
class RunOptions:
    out_dir: Path
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h in source pixels, applied before resizing
    save_video: Path | None = None
    video_fps: float = 25.0
    save_anomalies: bool = True
    show: bool = False
    reconnect: Reconnect = field(default_factory=Reconnect)
    max_frames: int | None = None
    keep_anomalies: int = 1000  # anomalous frames kept as pictures (oldest deleted first)
    pace_fps: float | None = None  # read file sources at most this fast (a video played as a camera delivers it)
    sinks: list = field(default_factory=list)  # stream.sinks.Sink objects (not started): verdicts to the line
    ui: str | None = None  # host:port of the operator station
    ui_token: str | None = None
    max_batch: int | None = None  # several sources: most frames per engine call [default: one per source]
    metrics_port: int | None = None  # live Prometheus metrics on this port (0: any free port)
    metrics_host: str = "127.0.0.1"

    def check_sources(self, n: int) -> None:
        """Refuse the outputs that take one source when a run has ``n`` > 1."""
        if n > 1 and (self.save_video or self.show):
            raise StfpmError("--save-video and --show take one source; with several, every record and anomaly picture names its source")

    def outputs(self, stop: threading.Event) -> list[Output]:
        """The picture outputs these options ask for (the JSONL record is always written)."""
        outs: list[Output] = []
        if self.save_video:
            outs.append(VideoOutput(self.save_video, self.video_fps))
        if self.save_anomalies:
            outs.append(AnomalyFiles(self.out_dir / "anomalies", self.keep_anomalies))
        if self.show:
            outs.append(Window(stop))
        return outs


OUTPUT_GIVE_UP = 100  # failures after which an output is no longer tried


class OutputStage:
    """The output side of the loop: one JSONL record per frame, then every picture output.

    A side output that fails (full disk, bad target) is reported once in the JSONL, counted, and
    left out after ``OUTPUT_GIVE_UP`` failures; inspection and the records go on.
    """

    def __init__(self, writer: JsonlWriter, outputs: list[Output], counters: list[Counters], events: list, inspector: Inspector, roi,
                 names: list[str] | None = None):
        self.writer, self.outputs, self.per_source, self.events, self.inspector, self.roi = writer, outputs, counters, events, inspector, roi
        self.names = names  # several sources: every record says which
        self.broken: dict = {}

    def handle(self, insp) -> None:
        while self.events:
            self.writer.write(self.events.pop(0))
        counters = self.per_source[insp.source]
        if self.names:
            insp.source_name = self.names[insp.source]
        if insp.result is None:
            counters.failed += 1
            self.writer.write(frame_record(insp))
            return
        t4 = time.perf_counter()
        picture = Picture(insp, self.inspector.geometry, insp.result.threshold, self.roi)
        for out in self.outputs:  # each draws on the shared picture only if it needs it
            self._write(out, insp, picture)
        t5 = time.perf_counter()
        insp.latency_ms["output"] = (t5 - t4) * 1e3
        insp.latency_ms["end_to_end"] = (t5 - insp.arrival) * 1e3
        counters.inspected += 1
        counters.anomalous += insp.result.verdict == ANOMALOUS
        counters.add_latency(insp.latency_ms)
        self.writer.write(frame_record(insp))

    def _write(self, out: Output, insp, picture) -> None:
        entry = self.broken.get(out)
        if entry is not None and entry["failed"] >= OUTPUT_GIVE_UP:
            return
        try:
            out.write(insp, picture)
        except OSError as exc:
            entry = self.broken.setdefault(out, {"output": type(out).__name__, "failed": 0, "error": mask_secrets(str(exc))})
            entry["failed"] += 1
            if entry["failed"] == 1:
                self.writer.write({"event": "output_failed", "frame": insp.frame.index, **entry})


def run_stream(engine_factory: Callable[[], Any], source: Source | list[Source], opts: RunOptions, stop: threading.Event | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Inspect a stream (or several) until it ends or ``stop`` is set; returns the end-of-run summary.

    Capture (a thread per source) -> inspection (its thread, owns the engine; with several sources
    one engine call takes the frames they have, see ``Mux``) -> outputs (this thread).
    """
    stop = stop or threading.Event()
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    multi = len(sources) > 1
    try:
        opts.check_sources(len(sources))
    except StfpmError:
        for src in sources:
            src.close()
        raise
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    names = [src.describe() for src in sources]
    per_source, events = [Counters() for _ in sources], []
    counters = per_source[0]
    if multi:
        mux = Mux([src.live for src in sources], max_batch=opts.max_batch)
        handovers: list = [mux.port(i) for i in range(len(sources))]
        inspector = Inspector(engine_factory, mux, stop, opts.roi)
    else:
        handovers = [handover_for(sources[0])]
        inspector = Inspector(engine_factory, handovers[0], stop, opts.roi)

    def close_sources():
        for src in sources:
            src.close()

    station = live = None
    try:  # bind before the engine opens: a taken port is a clear error before any frame
        if opts.metrics_port is not None:
            from .metrics import LiveMetrics

            live = LiveMetrics(opts.metrics_port, opts.metrics_host, per_source, names).start()
        if opts.ui:
            from .station import Station

            station = Station(opts.ui, opts.out_dir, per_source, names, inspector, events, opts.ui_token,
                              title=names[0] if not multi else f"{len(sources)} sources").start()
    except BaseException:
        close_sources()
        if live is not None:
            live.close()
        raise
    inspector.start()
    inspector.ready.wait()
    if inspector.error is not None:  # the engine did not open (missing file, metadata that does not fit): before any frame
        inspector.join()
        close_sources()
        for server in (station, live):
            if server is not None:
                server.close()
        raise inspector.error
    if station is not None:
        print(f"operator station: {station.url}", flush=True)
    if live is not None:
        print(f"metrics: http://{opts.metrics_host}:{live.port}/metrics", flush=True)
    for sink in opts.sinks:
        if not multi:
            sink.context.setdefault("source", names[0])
        sink.context["threshold"] = inspector.threshold
        sink.start()
    captures = [Capture(src, h, c, stop, events, opts.reconnect, opts.max_frames, opts.pace_fps) for src, h, c in zip(sources, handovers, per_source)]
    t_start = time.perf_counter()
    for capture in captures:
        capture.start()

    # the station after the anomaly files it shows
    outputs = opts.outputs(stop) + list(opts.sinks) + [o for o in (live, station) if o is not None]
    stage = OutputStage(JsonlWriter(opts.out_dir / "frames.jsonl"), outputs, per_source, events, inspector, opts.roi,
                        names if multi else None)
    writer, outputs = stage.writer, stage.outputs
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="inspecting", unit="frame")
    try:
        while True:
            insp = inspector.results.get()
            if insp is END:
                break
            stage.handle(insp)
            if bar is not None and insp.result is not None:
                bar.update(1)
    finally:
        stop.set()
        # if we stop early (an exception here), keep taking results so that inference and capture,
        # possibly blocked on full hand-over queues, can reach their end markers
        while inspector.is_alive():
            try:
                inspector.results.get(timeout=0.1)
            except queue.Empty:
                pass
        for capture in captures:
            capture.join()
        inspector.join()
        t_end = time.perf_counter()  # inspection is over: what follows (draining sinks, closing files) is not in the FPS
        while events:
            writer.write(events.pop(0))
        writer.close()
        for out in outputs:
            out.close()
        if bar is not None:
            bar.close()
        close_sources()
    wall = t_end - t_start
    if multi:
        summary = summarize(merged(per_source), wall)
        summary["sources"] = [{"source": name, **summarize(c, wall)} for name, c in zip(names, per_source)]
    else:
        summary = summarize(counters, wall)
        summary["source"] = names[0]
    summary["output_failures"] = list(stage.broken.values())
    summary["records_lost"] = writer.lost
    if writer.error:
        summary["records_error"] = writer.error
    summary["anomaly_files_rotated"] = sum(getattr(o, "rotated", 0) for o in outputs)
    summary["threshold"] = inspector.threshold
    if opts.sinks:
        summary["sinks"] = [s.stats() for s in opts.sinks]
    if station is not None:
        summary["ui"] = {"url": station.url, "threshold_changes": station.changes}
    if live is not None:
        summary["metrics"] = f"http://{opts.metrics_host}:{live.port}/metrics"
    if inspector.error is not None:
        summary["error"] = mask_secrets(str(inspector.error))
    try:
        atomic_write_json(opts.out_dir / "summary.json", summary)
    except OSError as exc:
        if inspector.error is None:
            raise StfpmError(f"{opts.out_dir / 'summary.json'}: cannot be written ({exc.strerror or exc}); "
                             f"{summary['frames_inspected']} frames inspected, {writer.lost} JSONL records lost") from None
    if inspector.error is not None:
        raise inspector.error
    return summary
