"""The verdict rule and the normalised score, defined once (run side, torch-free).

A frame is anomalous when its image score is strictly above the model's threshold. The normalised
score maps the threshold to 0.5: ``clip(0.5 * score / threshold, 0, 1)`` (0 = a perfect match,
1 = twice the threshold or more). Everything that decides or reports a verdict calls these: the
camera loop, line-scan, evaluation, reports, the benchmark, and the exported graph's
``normalized_score`` output (the functions work on NumPy arrays, scalars and torch tensors alike).
"""

from __future__ import annotations

from typing import Any

import numpy as np

GOOD, ANOMALOUS = "good", "anomalous"


def _array(x: Any):
    # torch tensors (the exported graph) keep their type; everything else becomes float32 NumPy
    return x if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)


def is_anomalous(score: Any, threshold: float):
    """The verdict rule: score strictly above the threshold (elementwise for arrays)."""
    return _array(score) > threshold


def verdict(score: float, threshold: float) -> str:
    return ANOMALOUS if bool(is_anomalous(score, threshold)) else GOOD


def normalized_score(score: Any, threshold: float):
    """0.5 at the threshold, 0 at a perfect match, 1 at twice the threshold or more."""
    return (_array(score) * (0.5 / float(threshold))).clip(0.0, 1.0)
