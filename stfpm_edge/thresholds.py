"""The operating threshold, from normal images only.

Rule: the threshold is the ``quantile`` (default 0.99) of the image scores of the held-out good
images (the 20% validation split, never trained on), linearly interpolated. No defect image is
needed. The verdict rule and the normalised score are in ``scoring`` (run side).
"""

from __future__ import annotations

import numpy as np

from .errors import StfpmError


def threshold_from_normal(scores: np.ndarray, quantile: float = 0.99) -> float:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise StfpmError("no held-out good images to derive a threshold from")
    if not 0.0 < quantile <= 1.0:
        raise StfpmError(f"threshold quantile must be in (0, 1], got {quantile}")
    return float(np.quantile(scores, quantile))


def normal_statistics(scores: np.ndarray) -> dict[str, float]:
    s = np.asarray(scores, dtype=np.float64)
    return {
        "n": int(s.size),
        "mean": float(s.mean()),
        "std": float(s.std()),
        "min": float(s.min()),
        "max": float(s.max()),
        "p50": float(np.quantile(s, 0.5)),
        "p99": float(np.quantile(s, 0.99)),
    }

