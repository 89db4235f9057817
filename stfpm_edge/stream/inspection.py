"""Inspection: the thread that owns the engine (TensorRT contexts belong to the thread that made them).

It takes ``(frame, arrival)`` items from the capture hand-over, crops the region of interest, fits
the frame to the model, infers, applies the verdict rule and passes an ``Inspection`` on. A frame
that cannot be inspected (undecodable, ROI outside it) is passed on with ``result = None``, so the
output stage accounts for every frame read.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..drift import image_stats
from ..engines.base import EngineUnavailable
from ..errors import StfpmError
from ..scoring import defect_regions, is_anomalous, normalized_score, verdict_with_area
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
    regions: list | None = None  # above the threshold: its defect regions (scoring.defect_regions), the largest first
    stats: dict | None = None  # brightness, contrast, sharpness of the frame at model size (drift.image_stats)
    recipe: str | None = None  # the product model that judged it (runs given several models)
    geometry: Any = None  # that model's geometry (its input size): how its map is laid back over the frame


@dataclass(frozen=True)
class AreaRule:
    """How a frame above the threshold is measured: ``mm_per_pixel`` (source pixels) gives areas in mm²;
    ``min_area`` (mm² with a scale, else source pixels): a frame whose regions are all smaller stays good."""

    min_area: float | None = None
    mm_per_pixel: float | None = None


@dataclass
class Inspection:
    frame: Frame
    result: Result | None  # None: the frame failed (frame.error says why)
    latency_ms: dict[str, float]
    arrival: float  # perf_counter when capture handed the frame over
    source: int = 0  # which of the run's sources (several: --source A --source B)
    batch: int = 1  # frames in the engine call that inspected this one
    source_name: str | None = None  # set by the output stage when a run has several sources
    switch: dict | None = None  # the first frame judged after a recipe change carries the change's event record


class Inspector:
    """Runs ``engine_factory()`` in its own thread and inspects frames until ``END``.

    ``engine_factory`` is one callable, or a dict of recipe name -> callable: one model per product.
    Every recipe's engine is opened at the start (a bad one fails the run before any frame); the first
    is active. ``request_recipe`` asks for another: the switch happens between two engine calls, so no
    frame is judged by a half-switched model, and the first frame judged after it carries the event.
    ``ready`` is set once the engines are open (``geometry`` and ``threshold`` of the active one are then
    known) or one failed to open (``error`` holds why). The results queue always ends with ``END``.
    """

    def __init__(self, engine_factory: Callable[[], Any] | dict[str, Callable[[], Any]], handover, stop: threading.Event, roi=None,
                 results_size: int = 8, area: AreaRule | None = None):
        self.factories = dict(engine_factory) if isinstance(engine_factory, dict) else {None: engine_factory}
        self.recipe: str | None = next(iter(self.factories))
        self.thresholds: dict = {}  # recipe -> its threshold (an operator's change applies to the active recipe's)
        self._engines: dict = {}
        self._pending: tuple[str, str] | None = None
        self._switch_lock = threading.Lock()
        self.handover, self.stop, self.roi = handover, stop, roi
        self.area = area or AreaRule()
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
        """Apply a new image threshold (to the active recipe) to the frames inspected from now on; returns the old one."""
        with self._switch_lock:
            old, self.threshold = self.threshold, float(value)
            self.thresholds[self.recipe] = self.threshold
        return old

    @property
    def recipes(self) -> list:
        return [name for name in self.factories if name is not None]

    def recipe_meta(self, name) -> dict:
        return self._engines[name].meta if name in self._engines else self.meta

    def request_recipe(self, name: str, who: str) -> None:
        """Judge the frames of the next engine call with recipe ``name``; an unknown name raises ``KeyError``."""
        if name not in self.factories or name is None:
            raise KeyError(name)
        with self._switch_lock:
            self._pending = (name, who)

    def _activate(self, name) -> None:
        engine = self._engines[name]
        self.recipe, self.engine = name, engine
        self.geometry, self.meta = engine.geometry, engine.meta
        self.threshold = self.thresholds.setdefault(name, engine.threshold)

    def _switch_if_asked(self) -> dict | None:
        with self._switch_lock:
            pending, self._pending = self._pending, None
            if pending is None or pending[0] == self.recipe:
                return None
            old = self.recipe
            self._activate(pending[0])
        return {"event": "recipe_changed", "old": old, "new": pending[0], "by": pending[1], "time": time.time(), "threshold": self.threshold}

    def _inspect(self, engine, items: list[tuple[int, tuple[Frame, float]]]) -> list[Inspection]:
        """Inspect ``(source index, (frame, arrival))`` items in one engine call; a frame that cannot
        be fitted fails alone, an engine that is unavailable fails the call's frames."""
        out: list[Inspection] = []
        ready = []
        for src, (frame, arrival) in items:
            t0 = time.perf_counter()
            lat = {"wait": (t0 - arrival) * 1e3}
            insp = Inspection(frame, None, lat, arrival, src)
            out.append(insp)
            if frame.image is None:
                continue
            try:
                region = crop(frame.image, self.roi)
                fitted, box = engine.geometry.fit_image(region)
            except ValueError as exc:
                frame.error = str(exc)
                continue
            lat["preprocess"] = (time.perf_counter() - t0) * 1e3
            ready.append((insp, fitted, (box.x0, box.y0, box.x1, box.y1), region.shape[:2]))
        if not ready:
            return out
        t1 = time.perf_counter()
        try:
            maps, scores = engine.infer(np.stack([r[1] for r in ready]))
        except EngineUnavailable as exc:  # a served model away for a moment: these frames fail, the run goes on
            for insp, *_ in ready:
                insp.frame.error = str(exc)
                insp.latency_ms.pop("preprocess", None)
            return out
        t2 = time.perf_counter()
        thr, area, recipe = self.threshold, self.area, self.recipe
        for k, (insp, fitted, content, size) in enumerate(ready):
            score = float(scores[k])
            regions = defect_regions(maps[k], thr, content, size, area.mm_per_pixel) if bool(is_anomalous(score, thr)) else None
            judged = verdict_with_area(score, thr, regions or [], area.min_area, area.mm_per_pixel is not None)
            insp.result = Result(score, float(normalized_score(score, thr)), judged, maps[k], thr, regions, image_stats(fitted), recipe, engine.geometry)
        t3 = time.perf_counter()
        for insp, *_ in ready:
            insp.latency_ms.update(inference=(t2 - t1) * 1e3, postprocess=(t3 - t2) * 1e3)
            insp.batch = len(ready)
        return out

    def _run(self) -> None:
        try:
            with contextlib.ExitStack() as opened:
                for name, factory in self.factories.items():  # every recipe now: a bad model fails before the first frame
                    try:
                        self._engines[name] = opened.enter_context(factory())
                    except StfpmError as exc:
                        if name is not None:  # say which of the run's models it is
                            exc.args = (f"recipe {name}: {exc}", *exc.args[1:])
                        raise
                with self._switch_lock:
                    self._activate(self.recipe)
                self.ready.set()
                batched = hasattr(self.handover, "get_batch")  # several sources: one engine call for the frames they have
                while True:
                    items = self.handover.get_batch() if batched else self.handover.get()
                    if items is END:
                        break
                    switch = self._switch_if_asked()  # between two engine calls: never a half-switched model
                    done = self._inspect(self.engine, items if batched else [(0, items)])
                    if switch is not None:  # an engine call always has at least one frame
                        done[0].switch = {**switch, "first_frame": done[0].frame.index}
                    for insp in done:
                        self.results.put(insp)
        except BaseException as exc:  # surfaced by the caller after the pipeline drained
            self.error = exc
            self.stop.set()
            if self.ready.is_set():  # capture runs: drain it so it can finish
                take = getattr(self.handover, "get_batch", self.handover.get)
                while take() is not END:
                    pass
            self.ready.set()
        finally:
            self.results.put(END)
