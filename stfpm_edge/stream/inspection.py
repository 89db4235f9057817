"""Inspection: the thread that owns the engine (TensorRT contexts belong to the thread that made them).

It takes ``(frame, arrival)`` items from the capture hand-over, crops the region of interest, fits
the frame to the model, infers, applies the verdict rule and passes an ``Inspection`` on. A frame
that cannot be inspected (undecodable, ROI outside it) is passed on with ``result = None``, so the
output stage accounts for every frame read.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..engines.base import EngineUnavailable
from ..scoring import normalized_score, verdict
from .capture import END
from .sources import Frame


def crop(img: np.ndarray, roi) -> np.ndarray:
    """``roi`` = (x, y, w, h) in source pixels, or None for the whole frame."""
    if roi is None:
        return img
    x, y, w, h = roi
    H, W = img.shape[:2]
    if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > W or y + h > H:
        raise ValueError(f"ROI {x},{y},{w},{h} lies outside the {W}x{H} frame")
    return img[y : y + h, x : x + w]


@dataclass
class Result:
    score: float
    normalized_score: float
    verdict: str
    map: np.ndarray  # at model size
    threshold: float  # the one the verdict used (an operator may change it during a run)


@dataclass
class Inspection:
    frame: Frame
    result: Result | None  # None: the frame failed (frame.error says why)
    latency_ms: dict[str, float]
    arrival: float  # perf_counter when capture handed the frame over


class Inspector:
    """Runs ``engine_factory()`` in its own thread and inspects frames until ``END``.

    ``ready`` is set once the engine is open (``geometry`` and ``threshold`` are then known) or
    failed to open (``error`` holds why). The results queue always ends with ``END``.
    """

    def __init__(self, engine_factory: Callable[[], Any], handover, stop: threading.Event, roi=None, results_size: int = 8):
        self.engine_factory, self.handover, self.stop, self.roi = engine_factory, handover, stop, roi
        self.results: queue.Queue = queue.Queue(maxsize=results_size)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.geometry = None
        self.threshold: float | None = None  # the engine's, until an operator changes it (set_threshold)
        self.meta: dict = {}
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    def start(self) -> "Inspector":
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()

    def set_threshold(self, value: float) -> float:
        """Apply a new image threshold to the frames inspected from now on; returns the old one."""
        old, self.threshold = self.threshold, float(value)
        return old

    def _inspect(self, engine, frame: Frame, arrival: float) -> Inspection:
        t0 = time.perf_counter()
        lat = {"wait": (t0 - arrival) * 1e3}
        if frame.image is None:
            return Inspection(frame, None, lat, arrival)
        try:
            fitted, _ = engine.geometry.fit_image(crop(frame.image, self.roi))
        except ValueError as exc:
            frame.error = str(exc)
            return Inspection(frame, None, lat, arrival)
        t1 = time.perf_counter()
        try:
            maps, scores = engine.infer(fitted)
        except EngineUnavailable as exc:  # a served model away for a moment: this frame fails, the run goes on
            frame.error = str(exc)
            return Inspection(frame, None, lat, arrival)
        t2 = time.perf_counter()
        score, thr = float(scores[0]), self.threshold
        result = Result(score, float(normalized_score(score, thr)), verdict(score, thr), maps[0], thr)
        t3 = time.perf_counter()
        lat.update(preprocess=(t1 - t0) * 1e3, inference=(t2 - t1) * 1e3, postprocess=(t3 - t2) * 1e3)
        return Inspection(frame, result, lat, arrival)

    def _run(self) -> None:
        try:
            with self.engine_factory() as engine:
                self.geometry, self.threshold, self.meta = engine.geometry, engine.threshold, engine.meta
                self.ready.set()
                while True:
                    item = self.handover.get()
                    if item is END:
                        break
                    self.results.put(self._inspect(engine, *item))
        except BaseException as exc:  # surfaced by the caller after the pipeline drained
            self.error = exc
            self.stop.set()
            if self.ready.is_set():  # capture runs: drain it so it can finish
                while self.handover.get() is not END:
                    pass
            self.ready.set()
        finally:
            self.results.put(END)
