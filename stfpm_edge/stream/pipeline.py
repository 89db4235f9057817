"""The inspection loop: a capture thread, an inference thread that owns the engine, an output thread.

Live sources keep only the newest frame (stale frames are dropped and counted, so latency stays
bounded); files and folders hand over every frame in order. Every frame read ends up as exactly
one JSONL record: inspected or failed. Each record is flushed when written, so a crash leaves a
valid JSONL file up to the last frame; Ctrl-C / SIGTERM drain the pipeline before returning.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from ..fileio import atomic_write_bytes, atomic_write_json, mask_secrets
from ..render import annotate, heat_overlay
from ..scoring import normalized_score, verdict
from ..timing import percentiles
from .sources import Source

_END = object()
STAGES = ("wait", "preprocess", "inference", "postprocess", "output", "end_to_end")


class LatestSlot:
    """A one-item mailbox for live sources: ``put`` replaces an unconsumed frame and reports the drop.

    The end marker never replaces a pending frame: it is delivered after it.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._item: Any = None
        self._has = False
        self._closed = False

    def put(self, item) -> bool:
        with self._cond:
            if item is _END:
                self._closed = True
                self._cond.notify()
                return False
            dropped = self._has
            self._item, self._has = item, True
            self._cond.notify()
            return dropped

    def get(self):
        with self._cond:
            while not self._has and not self._closed:
                self._cond.wait()
            if self._has:
                item, self._item, self._has = self._item, None, False
                return item
            return _END


class BlockingQueue:
    """Lossless hand-over for files and folders (bounded, so memory stays bounded)."""

    def __init__(self, size: int = 8):
        self._q: queue.Queue = queue.Queue(maxsize=size)

    def put(self, item) -> bool:
        self._q.put(item)
        return False

    def get(self):
        return self._q.get()


@dataclass
class RunOptions:
    out_dir: Path
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h in source pixels, applied before resizing
    save_video: Path | None = None
    video_fps: float = 25.0
    save_anomalies: bool = True
    show: bool = False
    max_reconnects: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    max_frames: int | None = None


@dataclass
class Counters:
    read: int = 0
    inspected: int = 0
    dropped: int = 0
    failed: int = 0
    anomalous: int = 0
    reconnects: int = 0
    gaps: list = field(default_factory=list)
    latency: dict = field(default_factory=lambda: {s: [] for s in STAGES})


class JsonlWriter:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()  # a crash leaves whole lines only

    def close(self) -> None:
        self._fh.close()


def _crop(img: np.ndarray, roi) -> np.ndarray:
    if roi is None:
        return img
    x, y, w, h = roi
    H, W = img.shape[:2]
    if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > W or y + h > H:
        raise ValueError(f"ROI {x},{y},{w},{h} lies outside the {W}x{H} frame")
    return img[y : y + h, x : x + w]


def summarize(c: Counters, wall_s: float) -> dict[str, Any]:
    lat = {stage: percentiles(vals) for stage, vals in c.latency.items() if vals}
    return {
        "frames_read": c.read, "frames_inspected": c.inspected, "frames_dropped": c.dropped, "frames_failed": c.failed,
        "frames_anomalous": c.anomalous, "accounted": c.read == c.inspected + c.failed + c.dropped,
        "reconnects": c.reconnects, "gaps": c.gaps, "wall_s": wall_s,
        "fps": c.inspected / wall_s if wall_s > 0 else 0.0, "latency_ms": lat,
    }


def _capture(source: Source, slot, counters: Counters, opts: RunOptions, stop: threading.Event, events: list) -> None:
    """Read frames; reopen live sources with bounded backoff; always end with _END."""
    try:
        failures = 0
        while not stop.is_set():
            if opts.max_frames is not None and counters.read >= opts.max_frames:
                break
            frame = source.read()
            if frame is None:
                if not source.live or failures >= opts.max_reconnects:
                    if source.live:
                        events.append({"event": "gave_up", "after_reconnects": failures, "source": source.describe()})
                    break
                t_lost = time.time()
                delay = min(opts.backoff_s * (2**failures), opts.backoff_max_s)
                failures += 1
                if stop.wait(delay):
                    break
                if source.reopen():
                    counters.reconnects += 1
                    gap = {"event": "reconnect", "gap_s": round(time.time() - t_lost, 3), "attempt": failures, "after_frame": counters.read - 1}
                    counters.gaps.append(gap)
                    events.append(gap)
                continue
            failures = 0
            counters.read += 1
            if slot.put((frame, time.perf_counter())):
                counters.dropped += 1
    finally:
        slot.put(_END)


def run_stream(engine_factory: Callable[[], Any], source: Source, opts: RunOptions, stop: threading.Event | None = None, progress: bool = False) -> dict[str, Any]:
    """Inspect a stream until it ends or ``stop`` is set; returns the end-of-run summary."""
    stop = stop or threading.Event()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    counters = Counters()
    slot = LatestSlot() if source.live else BlockingQueue()
    results: queue.Queue = queue.Queue(maxsize=8)
    events: list = []
    errors: list[BaseException] = []
    ready = threading.Event()
    engine_box: dict[str, Any] = {}

    def inference() -> None:
        try:
            with engine_factory() as engine:
                engine_box["geometry"], engine_box["threshold"] = engine.geometry, engine.threshold
                ready.set()
                while True:
                    item = slot.get()
                    if item is _END:
                        break
                    frame, t_arrival = item
                    t0 = time.perf_counter()
                    if frame.image is None:
                        results.put((frame, None, {"wait": (t0 - t_arrival) * 1e3}, t_arrival))
                        continue
                    try:
                        fitted, _ = engine.geometry.fit_image(_crop(frame.image, opts.roi))
                    except ValueError as exc:
                        frame.error = str(exc)
                        results.put((frame, None, {"wait": (t0 - t_arrival) * 1e3}, t_arrival))
                        continue
                    t1 = time.perf_counter()
                    maps, scores = engine.infer(fitted)
                    t2 = time.perf_counter()
                    score = float(scores[0])
                    thr = engine.threshold
                    out = {"score": score, "normalized_score": float(normalized_score(score, thr)), "verdict": verdict(score, thr), "map": maps[0]}
                    t3 = time.perf_counter()
                    results.put((frame, out, {"wait": (t0 - t_arrival) * 1e3, "preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}, t_arrival))
        except BaseException as exc:  # surfaced by the caller after the pipeline drained
            errors.append(exc)
            stop.set()
            if ready.is_set():  # capture runs: drain it so it can finish
                while slot.get() is not _END:
                    pass
            ready.set()
        finally:
            results.put(_END)

    inf_thread = threading.Thread(target=inference, name="inference", daemon=True)
    inf_thread.start()
    ready.wait()
    if errors:  # the engine did not open (missing file, metadata that does not fit): before any frame
        inf_thread.join()
        source.close()
        raise errors[0]
    cap_thread = threading.Thread(target=_capture, args=(source, slot, counters, opts, stop, events), name="capture", daemon=True)
    t_start = time.perf_counter()
    cap_thread.start()

    writer = JsonlWriter(opts.out_dir / "frames.jsonl")
    video, video_size = None, None
    anomalies_dir = opts.out_dir / "anomalies"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="inspecting", unit="frame")
    try:
        while True:
            item = results.get()
            if item is _END:
                break
            while events:
                writer.write(events.pop(0))
            frame, out, lat, t_arrival = item
            record: dict[str, Any] = {"frame": frame.index, "source_ts": frame.timestamp, "name": frame.name}
            if out is None:
                counters.failed += 1
                record.update({"status": "failed", "error": mask_secrets(frame.error or "undecodable frame")})
                writer.write(record)
                continue
            t4 = time.perf_counter()
            geo, thr = engine_box["geometry"], engine_box["threshold"]
            bad = out["verdict"] == "anomalous"
            need_vis = opts.save_video or opts.show or (bad and opts.save_anomalies)
            if need_vis:
                region = _crop(frame.image, opts.roi)
                amap = geo.unfit_map(out["map"], *region.shape[:2])
                vis = frame.image.copy()
                x, y = (opts.roi[0], opts.roi[1]) if opts.roi else (0, 0)
                vis[y : y + region.shape[0], x : x + region.shape[1]] = heat_overlay(region, amap, thr)
                if opts.roi:
                    cv2.rectangle(vis, (x, y), (x + region.shape[1], y + region.shape[0]), (255, 255, 255), 1)
                annotate(vis, f"#{frame.index} score {out['score']:.4g} ({out['normalized_score']:.2f}) {'ANOMALOUS' if bad else 'good'}", bad)
                if opts.save_video:
                    if video is None:
                        opts.save_video.parent.mkdir(parents=True, exist_ok=True)
                        video_size = (vis.shape[1], vis.shape[0])  # a video has one frame size: the first frame's
                        video = cv2.VideoWriter(str(opts.save_video), cv2.VideoWriter_fourcc(*"mp4v"), opts.video_fps, video_size)
                    video.write(vis if (vis.shape[1], vis.shape[0]) == video_size else cv2.resize(vis, video_size))
                if bad and opts.save_anomalies:
                    stem = f"{frame.index:06d}"
                    atomic_write_bytes(anomalies_dir / f"{stem}_overlay.jpg", cv2.imencode(".jpg", vis)[1].tobytes())
                    heat = cv2.applyColorMap((normalized_score(amap, thr) * 255).astype(np.uint8), cv2.COLORMAP_JET)
                    atomic_write_bytes(anomalies_dir / f"{stem}_heatmap.png", cv2.imencode(".png", heat)[1].tobytes())
                if opts.show:
                    cv2.imshow("stfpm-edge", vis)
                    if (cv2.waitKey(1) & 0xFF) == ord("q"):
                        stop.set()
            t5 = time.perf_counter()
            lat["output"] = (t5 - t4) * 1e3
            lat["end_to_end"] = (t5 - t_arrival) * 1e3
            counters.inspected += 1
            counters.anomalous += bad
            for k, v in lat.items():
                counters.latency[k].append(v)
            record.update({"status": "inspected", "score": out["score"], "normalized_score": out["normalized_score"], "verdict": out["verdict"],
                           "latency_ms": {k: round(v, 3) for k, v in lat.items()}})
            writer.write(record)
            if bar is not None:
                bar.update(1)
    finally:
        stop.set()
        # if we stop early (an exception here), keep taking results so that inference and capture,
        # possibly blocked on full hand-over queues, can reach their end markers
        while inf_thread.is_alive():
            try:
                results.get(timeout=0.1)
            except queue.Empty:
                pass
        cap_thread.join()
        inf_thread.join()
        while events:
            writer.write(events.pop(0))
        writer.close()
        if video is not None:
            video.release()
        if opts.show:
            cv2.destroyAllWindows()
        if bar is not None:
            bar.close()
        source.close()
    wall = time.perf_counter() - t_start
    summary = summarize(counters, wall)
    summary["source"] = source.describe()
    if errors:
        summary["error"] = mask_secrets(str(errors[0]))
    atomic_write_json(opts.out_dir / "summary.json", summary)
    if errors:
        raise errors[0]
    return summary
