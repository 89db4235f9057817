"""Drift: is the line still showing the model what it learned? (torch-free; training and run sides both use it)

Each inspected frame that was judged good gives four numbers: its image score and three image
statistics of the frame as the model sees it (at model size) — ``brightness`` (mean grey level),
``contrast`` (standard deviation of the grey levels) and ``sharpness`` (mean absolute Laplacian of the
grey image). The reference is what the model saw at training: the median and a robust spread of each
number over the good images (``reference_of``, stored in the checkpoint's ``normal_stats.drift``, and
so in every export). A model without one (trained before drift was followed) takes its reference from
the first ``BASELINE`` good frames of the run, and says so.

``DriftWatch`` follows the median of the last ``WINDOW`` good frames of each number. Its shift, in units
of the reference spread, is ``z``; drift is raised when some ``|z|`` reaches ``RAISE_Z`` (for the score:
only upwards, lower scores are no risk) and cleared when every ``|z|`` is back under ``CLEAR_Z``. A median
of 20 frames moves by about 0.3 spreads on a line that has not changed, so 4 spreads is not noise; and
because it follows the frames judged good, the shift shows while the frames still pass, before the
false calls begin.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

import cv2
import numpy as np

QUANTITIES = ("score", "brightness", "contrast", "sharpness")
IMAGE_QUANTITIES = QUANTITIES[1:]
WINDOW = 20  # good frames whose median is compared with the reference
BASELINE = 100  # good frames that make the reference of a model that carries none
RAISE_Z, CLEAR_Z = 4.0, 2.0
# the smallest spread each quantity is measured in: identical reference images would otherwise make any change "drift".
# Grey levels for brightness and contrast; a share of the median for sharpness and the score
SPREAD_FLOOR = {"brightness": 1.0, "contrast": 0.5}
RELATIVE_FLOOR = {"sharpness": 0.02, "score": 0.05}


def image_stats(bgr: np.ndarray) -> dict[str, float]:
    """Brightness, contrast and sharpness of a BGR (or grey) uint8 frame at model size."""
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) if bgr.ndim == 3 else bgr
    mean, std = cv2.meanStdDev(grey)
    lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=1)
    return {"brightness": float(mean[0, 0]), "contrast": float(std[0, 0]), "sharpness": float(np.abs(lap).mean())}


def summary_of(name: str, values: Iterable[float]) -> dict[str, float]:
    """Median and robust spread (1.4826 x the median absolute deviation, floored) of one quantity's values."""
    v = np.asarray(list(values), dtype=np.float64)
    med = float(np.median(v))
    spread = 1.4826 * float(np.median(np.abs(v - med)))
    floor = SPREAD_FLOOR.get(name, RELATIVE_FLOOR.get(name, 0.0) * abs(med))
    return {"median": med, "spread": max(spread, floor, 1e-12), "n": int(v.size)}


def reference_of(images: Iterable[np.ndarray], scores: Iterable[float] | None = None) -> dict[str, dict[str, float]]:
    """The drift reference of good images (BGR uint8 at model size) and, when given, their out-of-fold scores."""
    rows = [image_stats(img) for img in images]
    ref = {q: summary_of(q, [r[q] for r in rows]) for q in IMAGE_QUANTITIES} if rows else {}
    scores = [] if scores is None else list(scores)  # once: an iterator would be empty the second time
    if scores:
        ref["score"] = summary_of("score", scores)
    return ref


class DriftWatch:
    """Follows one source's good frames against ``reference`` (``reference_of``'s form; missing quantities are learned
    from the first ``baseline`` good frames). ``update`` returns an event record when drift is raised or cleared."""

    def __init__(self, reference: dict | None, window: int = WINDOW, baseline: int = BASELINE, raise_z: float = RAISE_Z,
                 clear_z: float = CLEAR_Z):
        self.reference = {q: dict(v) for q, v in (reference or {}).items() if q in QUANTITIES}
        self.learned = [q for q in QUANTITIES if q not in self.reference]  # from the run's first good frames
        self.window, self.baseline, self.raise_z, self.clear_z = window, baseline, raise_z, clear_z
        self.recent = {q: deque(maxlen=window) for q in QUANTITIES}
        self._first: dict[str, list] = {q: [] for q in self.learned}
        self.drifting = False
        self.z: dict[str, float] = {}
        self.events = 0

    @property
    def source(self) -> str:
        if not self.learned:
            return "the training images"
        return f"the training images and the run's first {self.baseline} good frames ({', '.join(self.learned)})" \
            if len(self.learned) < len(QUANTITIES) else f"the run's first {self.baseline} good frames"

    def update(self, values: dict[str, float], frame: int) -> dict | None:
        """One good frame's ``score`` and image statistics; an event record when the drift state changes."""
        for q in self.learned:
            if q in self._first and q in values:
                self._first[q].append(values[q])
                if len(self._first[q]) >= self.baseline:
                    self.reference[q] = summary_of(q, self._first.pop(q))
        for q in QUANTITIES:
            if q in values:
                self.recent[q].append(values[q])
        z = {}
        for q, ref in self.reference.items():
            if len(self.recent[q]) == self.window:
                z[q] = (float(np.median(self.recent[q])) - ref["median"]) / ref["spread"]
        self.z = z
        shifted = {q: v for q, v in z.items() if (v if q == "score" else abs(v)) >= self.raise_z}
        if not self.drifting and shifted:
            self.drifting = True
            return self._event("raised", frame, shifted)
        if self.drifting and z and all(abs(v) < self.clear_z for v in z.values()):
            self.drifting = False
            return self._event("cleared", frame, z)
        return None

    def _event(self, state: str, frame: int, which: dict[str, float]) -> dict:
        self.events += 1
        quantities = {q: {"recent_median": round(float(np.median(self.recent[q])), 6), "reference": round(self.reference[q]["median"], 6),
                          "z": round(v, 2)} for q, v in which.items()}
        return {"event": "drift", "state": state, "frame": frame, "quantities": quantities,
                "window_frames": self.window, "reference_from": self.source}

    def status(self) -> dict:
        return {"drifting": self.drifting, "events": self.events, "z": {q: round(v, 2) for q, v in self.z.items()},
                "reference_from": self.source}


def reference_from_meta(meta: dict) -> dict:
    """A model's drift reference: its ``normal_stats.drift``; for a model trained before it was kept, the score alone
    (from its stored good scores, when it has them) and the image statistics learned at the start of the run."""
    stats = (meta or {}).get("normal_stats") or {}
    if stats.get("drift"):
        return stats["drift"]
    scores = stats.get("heldout_scores")
    return {"score": summary_of("score", scores)} if scores else {}


def describe(event: dict) -> str:
    """One line for a person: which numbers moved, from what to what."""
    parts = [f"{q} {v['recent_median']:.4g} (reference {v['reference']:.4g}, {v['z']:+.1f} spreads)" for q, v in event["quantities"].items()]
    where = f" on {event['source']}" if event.get("source") else ""
    if event["state"] == "raised":
        return f"drift{where} from frame {event['frame']}: " + "; ".join(parts) + " (the good frames no longer look like the training images)"
    return f"drift cleared{where} at frame {event['frame']}: the good frames look like the training images again"
