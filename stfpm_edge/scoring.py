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


# most regions listed per frame: the largest by area; smaller ones beyond are not listed (the verdict saw them all)
MAX_REGIONS = 20


def defect_regions(amap: np.ndarray, threshold: float, content=None, source_size: tuple[int, int] | None = None,
                   mm_per_pixel: float | None = None) -> list[dict[str, Any]]:
    """The defect regions of one model-size map: 8-connected components of the pixels above ``threshold``.

    ``content``: the map's content box (x0, y0, x1, y1) in model pixels (letterbox padding is no part);
    ``source_size``: (height, width) of the inspected image, so boxes and areas are in its pixels; with
    ``mm_per_pixel`` each region also has its area in mm². Each region: ``box`` [x, y, w, h], ``area_px``,
    ``peak`` (the map's highest value in it), ``area_mm2``; the largest first, at most MAX_REGIONS.
    """
    import cv2

    amap = np.asarray(amap, dtype=np.float32)
    x0, y0, x1, y1 = content if content is not None else (0, 0, amap.shape[1], amap.shape[0])
    part = amap[y0:y1, x0:x1]
    sy, sx = (source_size[0] / part.shape[0], source_size[1] / part.shape[1]) if source_size else (1.0, 1.0)
    above = (part > threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    if count <= 1:
        return []
    peaks = np.full(count, -np.inf, dtype=np.float32)
    np.maximum.at(peaks, labels.ravel(), part.ravel())
    regions = []
    for k in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[k])
        px = area * sx * sy
        r = {"box": [round(x * sx), round(y * sy), max(1, round(w * sx)), max(1, round(h * sy))], "area_px": round(px, 1),
             "peak": float(peaks[k])}
        if mm_per_pixel:
            r["area_mm2"] = round(px * mm_per_pixel**2, 4)
        regions.append(r)
    regions.sort(key=lambda r: -r["area_px"])
    return regions[:MAX_REGIONS]


def region_area(region: dict[str, Any], mm: bool) -> float:
    return region["area_mm2"] if mm else region["area_px"]


def verdict_with_area(score: float, threshold: float, regions: list[dict[str, Any]], min_area: float | None, mm: bool) -> str:
    """The verdict rule with an inspection spec's minimum defect area: above the threshold, and (when ``min_area`` is
    given) at least one region of that area or more (in mm² when ``mm``, else source pixels). A frame above the
    threshold whose regions are all smaller stays good."""
    if not bool(is_anomalous(score, threshold)):
        return GOOD
    if min_area is None or any(region_area(r, mm) >= min_area for r in regions):
        return ANOMALOUS
    return GOOD
