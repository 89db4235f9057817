"""Evaluation metrics (the protocol of GUIDE.md). ROC and PR curves come from scikit-learn.

Every metric returns ``None`` plus a reason when the data cannot support it (e.g. a test set
without defects has no AUROC), instead of raising.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score, roc_curve

from .scoring import is_anomalous
from .thresholds import operating_points


def _two_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and labels.min() != labels.max()


def best_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """The best F1 over all thresholds (the seed's "pixel F1")."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def aupro(maps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None, fpr_limit: float = 0.3, steps: int = 2000) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    Regions are the 8-connected components of each ground-truth mask. For a threshold t the PRO is
    the mean, over regions, of the fraction of the region's pixels scoring above t; the FPR is the
    fraction of normal pixels above t. Thresholds are placed on quantiles of the normal pixels so
    the FPR axis in [0, fpr_limit] is sampled evenly.
    """
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks).astype(bool)
    valid = np.ones_like(masks) if valid is None else np.asarray(valid, dtype=bool)
    normal = np.sort(maps[valid & ~masks])
    regions: list[np.ndarray] = []
    structure = np.ones((3, 3), dtype=bool)
    for m, s, v in zip(masks, maps, valid):
        labelled, n = ndimage.label(m & v, structure=structure)
        if n == 0:
            continue
        order = np.argsort(labelled, axis=None, kind="stable")
        flat_lab = labelled.ravel()[order]
        flat_scores = s.ravel()[order]
        bounds = np.searchsorted(flat_lab, np.arange(1, n + 2))
        for k in range(n):
            regions.append(np.sort(flat_scores[bounds[k] : bounds[k + 1]]))
    if not regions or normal.size == 0:
        raise ValueError("AUPRO needs both defect regions and normal pixels")
    levels = np.linspace(0.0, fpr_limit, steps)
    thresholds = np.quantile(normal, 1.0 - levels)
    fpr = (normal.size - np.searchsorted(normal, thresholds, side="right")) / normal.size
    pro = np.zeros_like(thresholds)
    for r in regions:
        pro += (r.size - np.searchsorted(r, thresholds, side="right")) / r.size
    pro /= len(regions)
    # fpr rises as the threshold falls; integrate PRO over FPR in [0, fpr_limit]
    keep = fpr <= fpr_limit
    x = np.concatenate([fpr[keep], [fpr_limit]])
    y = np.concatenate([pro[keep], [np.interp(fpr_limit, fpr, pro)]])
    return float(sk_auc(x, y) / fpr_limit)  # the trapezoid rule (works on NumPy 1 and 2)


def pixel_pairs(maps: np.ndarray, masks: np.ndarray, has_mask: np.ndarray, valid: np.ndarray | None):
    """The pixels the pixel metrics rank: (scores, labels) of the labelled images' content pixels, and the
    (maps, masks, valid) of those images for region metrics."""
    sel = np.asarray(has_mask, dtype=bool)
    m, g = maps[sel], masks[sel].astype(bool)
    v = np.ones_like(g) if valid is None else valid[sel]
    return m[v], g[v], (m, g, v)


def evaluate_scores(
    labels: np.ndarray,
    scores: np.ndarray,
    maps: np.ndarray | None,
    masks: np.ndarray | None,
    has_mask: np.ndarray | None,
    valid: np.ndarray | None,
    threshold: float | None,
) -> dict[str, Any]:
    """All metrics of the protocol. ``maps``/``masks``/``valid`` are [N,H,W] at model size."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    out: dict[str, Any] = {
        "n_images": int(labels.size),
        "n_anomalous": int(labels.sum()),
        "image_auroc": None,
        "pixel_auroc": None,
        "pixel_f1": None,
        "aupro": None,
        "image_f1": None,
        "threshold": threshold,
        "notes": [],
    }
    if _two_classes(labels):
        out["image_auroc"] = float(roc_auc_score(labels, scores))
    else:
        out["notes"].append("image AUROC is undefined: the test set has only one class (good or defect)")
    if threshold is not None and labels.size:
        predicted = is_anomalous(scores, threshold).astype(int)
        out["image_f1"] = float(f1_score(labels, predicted, zero_division=0.0))
        out["image_accuracy"] = float((predicted == labels).mean())
        # on test good images: they neither trained the student nor selected it nor set the threshold
        out["false_alarm_rate"] = float(predicted[labels == 0].mean()) if (labels == 0).any() else None
        out["miss_rate"] = float(1 - predicted[labels == 1].mean()) if (labels == 1).any() else None
        out["good_flagged"] = int(predicted[labels == 0].sum())
        out["defects_missed"] = int((1 - predicted[labels == 1]).sum())
    # the operating curve, for reporting only (set on the test's good images): misses at false-call rates 0.1 %, 1 %, 5 %
    out["operating_points"] = operating_points(labels, scores)
    if maps is None or masks is None or has_mask is None or not has_mask.any():
        out["notes"].append("no pixel labels: pixel metrics skipped")
        return out
    pix_scores, pix_labels, (m, g, v) = pixel_pairs(maps, masks, has_mask, valid)
    if not _two_classes(pix_labels.astype(int)):
        out["notes"].append("pixel metrics are undefined: no defect pixels in the labelled images")
        return out
    out["pixel_auroc"] = float(roc_auc_score(pix_labels, pix_scores))
    out["pixel_f1"] = best_f1(pix_labels, pix_scores)
    out["aupro"] = aupro(m, g, v)
    if has_mask.sum() < labels.size:
        out["notes"].append(f"{int(labels.size - has_mask.sum())} defect images have no mask and are left out of the pixel metrics")
    return out


def image_roc(labels: np.ndarray, scores: np.ndarray):
    """(fpr, tpr) for plotting, or None if undefined."""
    labels = np.asarray(labels).astype(int)
    if not _two_classes(labels):
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr
