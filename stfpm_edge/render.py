"""Drawing on frames: heat-map overlays and verdict labels. Light on purpose (cv2 + numpy only):
the camera loop uses it, and so do the evaluation reports."""

from __future__ import annotations

import cv2
import numpy as np

from .scoring import normalized_score


def heat_overlay(image_bgr: np.ndarray, amap: np.ndarray, threshold: float | None, alpha: float = 0.45) -> np.ndarray:
    """Blend a colour heat map (0.5 = threshold when known) over the image at the image's size."""
    if threshold is not None:
        norm = normalized_score(amap, threshold)
    else:
        lo, hi = float(amap.min()), float(amap.max())
        norm = (amap - lo) / (hi - lo + 1e-12)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(image_bgr, 1 - alpha, heat, alpha, 0)


def annotate(img: np.ndarray, text: str, bad: bool | None) -> np.ndarray:
    colour = (0, 0, 255) if bad else (0, 200, 0) if bad is not None else (255, 255, 255)
    scale = max(0.4, img.shape[1] / 900)
    thick = max(1, int(round(scale * 2)))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    cv2.rectangle(img, (0, 0), (tw + 10, th + base + 10), (0, 0, 0), -1)
    cv2.putText(img, text, (5, th + 5), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick, cv2.LINE_AA)
    return img
