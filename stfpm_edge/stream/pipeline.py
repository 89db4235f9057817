"""The inspection loop: a capture thread, an inference thread that owns the engine, an output thread.

Live sources keep only the newest frame (stale frames are dropped and counted, so latency stays
bounded); files and folders hand over every frame in order. Every frame read ends up as exactly
one JSONL record: inspected or failed. Each record is flushed when written, so a crash leaves a
valid JSONL file up to the last frame; Ctrl-C / SIGTERM drain the pipeline before returning.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..drift import DriftWatch, describe, reference_from_meta
from ..errors import StfpmError
from ..fileio import ReservedJson, mask_secrets
from ..scoring import ANOMALOUS
from .capture import END, Capture, Mux, Reconnect, handover_for
from .counters import Counters, merged, summarize
from .inspection import AreaRule, Inspector
from .outputs import AnomalyFiles, JsonlWriter, Output, Picture, VideoOutput, Window, frame_record
from .sources import Source
from .watchdog import SystemdNotifier


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
    area: AreaRule = field(default_factory=AreaRule)  # defect regions in mm², the inspection spec's minimum defect area
    controls: list = field(default_factory=list)  # stream.control.RecipeControl objects (not started): changeovers from MQTT / the PLC
    trigger: Any = None  # stream.handshake.PlcHandshake (not started): one frame per PLC trigger, the verdict answered to the PLC

    def check_sources(self, n: int) -> None:
        """Refuse the outputs that take one source when a run has ``n`` > 1."""
        if n > 1 and (self.save_video or self.show):
            raise StfpmError("--save-video and --show take one source; with several, every record and anomaly picture names its source")
        if n > 1 and self.trigger is not None:
            raise StfpmError("--trigger serves one camera: one PLC handshake per run")

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
        self.switches: list[dict] = []
        self.watches: dict = {}  # (source, recipe) -> DriftWatch: each product is compared with its own training images

    def handle(self, insp) -> None:
        while self.events:
            self.writer.write(self.events.pop(0))
        if insp.switch is not None:  # a recipe change, just before the first frame the new model judged
            self.writer.write(insp.switch)
            self.switches.append(insp.switch)
        counters = self.per_source[insp.source]
        if self.names:
            insp.source_name = self.names[insp.source]
        if insp.result is None:
            counters.failed += 1
            self.writer.write(frame_record(insp))
            return
        t4 = time.perf_counter()
        picture = Picture(insp, insp.result.geometry or self.inspector.geometry, insp.result.threshold, self.roi)
        for out in self.outputs:  # each draws on the shared picture only if it needs it
            self._write(out, insp, picture)
        t5 = time.perf_counter()
        insp.latency_ms["output"] = (t5 - t4) * 1e3
        insp.latency_ms["end_to_end"] = (t5 - insp.arrival) * 1e3
        counters.inspected += 1
        counters.anomalous += insp.result.verdict == ANOMALOUS
        counters.add_latency(insp.latency_ms)
        self.writer.write(frame_record(insp))
        if insp.result.verdict != ANOMALOUS:
            key = (insp.source, insp.result.recipe)
            if key not in self.watches:
                self.watches[key] = DriftWatch(reference_from_meta(self.inspector.recipe_meta(insp.result.recipe)))
            counters.drift = self.watches[key]
            self._follow_drift(counters.drift, insp)

    def _follow_drift(self, watch, insp) -> None:
        """A good frame's score and image statistics to its source's drift watch; a change of state is an event record,
        a line on stderr, and a message to every output that takes events (sinks, the station)."""
        event = watch.update({"score": insp.result.score, **(insp.result.stats or {})}, insp.frame.index)
        if event is None:
            return
        if insp.source_name is not None:
            event["source"] = insp.source_name
        event["time"] = time.time()
        self.writer.write(event)
        print(f"{'warning: ' if event['state'] == 'raised' else ''}{describe(event)}", file=sys.stderr, flush=True)
        for out in self.outputs:
            try:
                out.event(event)
            except OSError:
                pass

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
    run = StreamRun(engine_factory, list(source) if isinstance(source, (list, tuple)) else [source], opts, stop or threading.Event())
    run.start()
    try:
        run.loop(progress)
    finally:
        run.shut_down()
    return run.finish()


class StreamRun:
    """One run of ``run_stream``, in the order it happens: start, loop, shut down, finish (summary)."""

    def __init__(self, engine_factory: Callable[[], Any], sources: list[Source], opts: RunOptions, stop: threading.Event):
        self.sources, self.opts, self.stop = sources, opts, stop
        self.multi = len(sources) > 1
        try:
            opts.check_sources(len(sources))
        except StfpmError:
            self.close_sources()
            raise
        opts.out_dir.mkdir(parents=True, exist_ok=True)
        if opts.trigger is not None:  # a frame per PLC trigger
            sources = self.sources = [opts.trigger.gate(sources[0], stop)]
        self.names = [src.describe() for src in sources]
        self.per_source, self.events = [Counters() for _ in sources], []
        if self.multi:
            mux = Mux([src.live for src in sources], max_batch=opts.max_batch)
            self.handovers: list = [mux.port(i) for i in range(len(sources))]
            self.inspector = Inspector(engine_factory, mux, stop, opts.roi, area=opts.area)
        else:
            self.handovers = [handover_for(sources[0])]
            self.inspector = Inspector(engine_factory, self.handovers[0], stop, opts.roi, area=opts.area)
        self.station = self.live = None
        self.captures: list[Capture] = []
        self.summary_file = ReservedJson(opts.out_dir / "summary.json")
        self.notifier = SystemdNotifier()  # systemd's watchdog, fed by inspected frames (a no-op outside systemd)

    def close_sources(self) -> None:
        for src in self.sources:
            src.close()

    def _close_servers(self) -> None:
        for server in (self.station, self.live):
            if server is not None:
                server.close()

    def start(self) -> None:
        """Servers (a taken port is a clear error before any frame), the engine, the summary's space, sinks, capture."""
        opts = self.opts
        try:
            if opts.metrics_port is not None:
                from .metrics import LiveMetrics

                self.live = LiveMetrics(opts.metrics_port, opts.metrics_host, self.per_source, self.names).start()
            if opts.ui:
                from .station import Station

                self.station = Station(opts.ui, opts.out_dir, self.per_source, self.names, self.inspector, self.events, opts.ui_token,
                                       title=self.names[0] if not self.multi else f"{len(self.sources)} sources").start()
            self.inspector.start()
            self.inspector.ready.wait()
            if self.inspector.error is not None:  # the engine did not open (missing file, metadata that does not fit): before any frame
                self.inspector.join()
                raise self.inspector.error
            if opts.trigger is not None:  # the PLC must answer before any frame: a clear error, not a wait
                opts.trigger.events = self.events
                try:
                    opts.trigger.start()
                except BaseException:
                    for handover in self.handovers:
                        handover.put(END)
                    self._stop_inspector()
                    raise
            try:  # the one file an operator opens first: its space is taken now, so that a full disk later cannot keep it from being written
                self.summary_file.reserve({"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sources": self.names,
                                           "note": "the run has not finished; frames.jsonl holds every frame's record so far"})
            except BaseException:
                for handover in self.handovers:  # no capture has started and none will feed inference: end its input
                    handover.put(END)
                self._stop_inspector()
                if opts.trigger is not None:
                    opts.trigger.close()
                raise
        except BaseException:
            self.close_sources()
            self._close_servers()
            raise
        if self.station is not None:
            print(f"operator station: {self.station.url}", flush=True)
        if self.live is not None:
            print(f"metrics: http://{opts.metrics_host}:{self.live.port}/metrics", flush=True)
        for control in opts.controls:
            control.start(self.inspector, self.events)
        for sink in opts.sinks:
            if not self.multi:
                sink.context.setdefault("source", self.names[0])
            sink.context["threshold"] = self.inspector.threshold
            sink.start()
        self.captures = [Capture(src, h, c, self.stop, self.events, opts.reconnect, opts.max_frames, opts.pace_fps)
                         for src, h, c in zip(self.sources, self.handovers, self.per_source)]
        self.t_start = self.t_end = time.perf_counter()
        for capture in self.captures:
            capture.start()
        self.notifier.ready()
        # the station after the anomaly files it shows
        outputs = opts.outputs(self.stop) + list(opts.sinks) + [o for o in (opts.trigger, self.live, self.station) if o is not None]
        self.stage = OutputStage(JsonlWriter(opts.out_dir / "frames.jsonl"), outputs, self.per_source, self.events, self.inspector, opts.roi,
                                 self.names if self.multi else None)

    def loop(self, progress: bool) -> None:
        """Every inspection result through the output stage, until the end marker."""
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc="inspecting", unit="frame")
        try:
            while True:
                insp = self.inspector.results.get()
                if insp is END:
                    break
                self.stage.handle(insp)
                if insp.result is not None:
                    self.notifier.alive()
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def shut_down(self) -> None:
        """Stop capture and inference (also after an exception in the loop), then drain and close every output."""
        self.notifier.stopping()
        for control in self.opts.controls:
            control.close()
        self._stop_inspector()
        for capture in self.captures:
            capture.join()
        self.t_end = time.perf_counter()  # inspection is over: what follows (draining sinks, closing files) is not in the FPS
        if self.opts.trigger is not None:  # the last cycle's answer and acknowledgement, and their events, before the records close
            self.opts.trigger.close()
        writer = self.stage.writer
        while self.events:
            writer.write(self.events.pop(0))
        writer.close()
        for out in self.stage.outputs:
            out.close()
        self.close_sources()

    def _stop_inspector(self) -> None:
        self.stop.set()
        # if we stop early (an exception in the loop), keep taking results so that inference and capture,
        # possibly blocked on full hand-over queues, can reach their end markers
        while self.inspector.is_alive():
            try:
                self.inspector.results.get(timeout=0.1)
            except queue.Empty:
                pass
        self.inspector.join()

    def summary(self) -> dict[str, Any]:
        wall = self.t_end - self.t_start
        if self.multi:
            summary = summarize(merged(self.per_source), wall)
            summary["sources"] = [{"source": name, **summarize(c, wall)} for name, c in zip(self.names, self.per_source)]
        else:
            summary = summarize(self.per_source[0], wall)
            summary["source"] = self.names[0]
        outputs, writer, opts = self.stage.outputs, self.stage.writer, self.opts
        summary["output_failures"] = list(self.stage.broken.values())
        for out in outputs:  # outputs that find out only at the end that their file is broken (a video on a full disk)
            problem = getattr(out, "problem", None)
            if problem:
                summary["output_failures"].append({"output": type(out).__name__, "failed": 1, "error": mask_secrets(problem)})
                summary["video_error"] = mask_secrets(problem)
        summary["records_lost"] = writer.lost
        if writer.error:
            summary["records_error"] = writer.error
        summary["anomaly_files_rotated"] = sum(getattr(o, "rotated", 0) for o in outputs)
        summary["threshold"] = self.inspector.threshold
        if self.inspector.recipes:
            summary["recipe"] = self.inspector.recipe
            summary["recipes"] = {name: {"threshold": self.inspector.thresholds.get(name)} for name in self.inspector.recipes}
            summary["recipe_changes"] = self.stage.switches
            if opts.controls:
                summary["recipe_controls"] = [c.stats() for c in opts.controls]
        watches = [c.drift for c in self.per_source if c.drift is not None]
        if watches:
            summary["drift"] = watches[0].status() if not self.multi else {n: c.drift.status() for n, c in zip(self.names, self.per_source) if c.drift}
        if opts.sinks:
            summary["sinks"] = [s.stats() for s in opts.sinks]
        if opts.trigger is not None:
            summary["handshake"] = opts.trigger.stats()
        if self.station is not None:
            summary["ui"] = {"url": self.station.url, "threshold_changes": [c for c in self.station.changes if c["event"] == "threshold_changed"],
                             "feedback": self.station.feedback}
        if self.live is not None:
            summary["metrics"] = f"http://{opts.metrics_host}:{self.live.port}/metrics"
        if self.inspector.error is not None:
            summary["error"] = mask_secrets(str(self.inspector.error))
        summary["status"] = "failed" if self.inspector.error is not None else "finished"
        return summary

    def finish(self) -> dict[str, Any]:
        """The summary, written whatever the disk does (into the space reserved at the start when it is full)."""
        summary = self.summary()
        path = self.opts.out_dir / "summary.json"
        try:
            summary["summary_in_reserved_space"] = False
            if self.summary_file.write(summary):
                summary["summary_in_reserved_space"] = True
                self.summary_file.write(summary)  # into the same reserved bytes, now saying so
                print(f"warning: the disk is full: {path} was written into the space reserved for it when the run started", file=sys.stderr, flush=True)
        except OSError as exc:
            if self.inspector.error is None:
                raise StfpmError(f"{path}: cannot be written ({exc.strerror or exc}); "
                                 f"{summary['frames_inspected']} frames inspected, {summary['records_lost']} JSONL records lost") from None
        if self.inspector.error is not None:
            raise self.inspector.error
        return summary
