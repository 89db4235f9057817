"""What a run counts: frames read / inspected / dropped / failed / anomalous, reconnects, latencies.

Latencies are kept in a fixed window of the most recent frames (``LATENCY_WINDOW``), so memory does
not grow with the length of a run; the summary's percentiles describe that window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..timing import percentiles

STAGES = ("wait", "preprocess", "inference", "postprocess", "output", "end_to_end")
LATENCY_WINDOW = 10_000  # frames per stage (about 5.5 minutes at 30 FPS): percentiles describe recent behaviour


def _window() -> dict[str, deque]:
    return {s: deque(maxlen=LATENCY_WINDOW) for s in STAGES}


@dataclass
class Counters:
    read: int = 0
    inspected: int = 0
    dropped: int = 0
    failed: int = 0
    anomalous: int = 0
    reconnects: int = 0
    stalls: int = 0  # live source reads that did not return within the stall time (then reopened)
    gaps: deque = field(default_factory=lambda: deque(maxlen=1000))
    latency: dict = field(default_factory=_window)
    drift: Any = None  # the source's drift.DriftWatch, set by the run

    def add_latency(self, stages: dict[str, float]) -> None:
        for k, v in stages.items():
            self.latency.setdefault(k, deque(maxlen=LATENCY_WINDOW)).append(v)


def summarize(c: Counters, wall_s: float) -> dict[str, Any]:
    lat = {stage: percentiles(vals) for stage, vals in c.latency.items() if vals}
    return {
        "frames_read": c.read, "frames_inspected": c.inspected, "frames_dropped": c.dropped, "frames_failed": c.failed,
        "frames_anomalous": c.anomalous, "accounted": c.read == c.inspected + c.failed + c.dropped,
        "reconnects": c.reconnects, "stalls": c.stalls, "gaps": list(c.gaps), "wall_s": wall_s,
        "fps": c.inspected / wall_s if wall_s > 0 else 0.0, "latency_ms": lat,
        "latency_window_frames": LATENCY_WINDOW,
    }


def merged(parts: list[Counters]) -> Counters:
    """The counters of several sources added up (latency windows pooled, each still bounded)."""
    total = Counters()
    for c in parts:
        for name in ("read", "inspected", "dropped", "failed", "anomalous", "reconnects", "stalls"):
            setattr(total, name, getattr(total, name) + getattr(c, name))
        total.gaps.extend(c.gaps)
        for stage, values in c.latency.items():
            total.latency.setdefault(stage, deque(maxlen=LATENCY_WINDOW)).extend(values)
    return total
