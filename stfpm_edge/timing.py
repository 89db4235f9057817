"""Latency summaries shared by the camera loop, line-scan and the benchmark (run side, NumPy only)."""

from __future__ import annotations

import numpy as np

from .errors import StfpmError


def percentiles(samples_ms) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise StfpmError("no samples to summarise")
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max()), "mean": float(a.mean()), "n": int(a.size)}
