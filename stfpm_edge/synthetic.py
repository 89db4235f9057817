"""Procedural textured surfaces with planted defects: for tests and the demo (no real data needed).

Everything here is generated; it says nothing about accuracy on real parts.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .fileio import atomic_write_bytes


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A woven-looking BGR uint8 surface: oriented stripes plus blurred grain, with small random drift."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    period = 9.0 + rng.uniform(-0.3, 0.3)
    base = 0.5 + 0.18 * np.sin(2 * np.pi * xx / period + phase[0]) * np.sin(2 * np.pi * yy / period + phase[1])
    grain = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 1.5)
    gray = np.clip(base + 0.05 * grain, 0, 1)
    tint = np.array([0.85, 0.95, 1.0], np.float32) + rng.uniform(-0.02, 0.02, 3).astype(np.float32)
    return np.clip(gray[..., None] * tint * 255, 0, 255).astype(np.uint8)


def add_defect(img: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Plant one defect (scratch, stain or hole); returns (image, 0/1 mask, kind)."""
    h, w = img.shape[:2]
    kind = kind or str(rng.choice(["scratch", "stain", "hole"]))
    out = img.copy()
    mask = np.zeros((h, w), np.uint8)
    s = min(h, w)
    cx, cy = int(rng.integers(s // 5, w - s // 5)), int(rng.integers(s // 5, h - s // 5))
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.25, 0.45) * s
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        p0, p1 = (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy))
        thick = max(2, s // 40)
        cv2.line(mask, p0, p1, 1, thick)
        cv2.line(out, p0, p1, (235, 235, 240), thick)
    elif kind == "stain":
        axes = (int(rng.uniform(0.06, 0.12) * s), int(rng.uniform(0.04, 0.09) * s))
        cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        stain = (out.astype(np.float32) * np.array([0.45, 0.6, 0.9], np.float32)).astype(np.uint8)
        out[mask > 0] = stain[mask > 0]
    elif kind == "hole":
        r = max(3, int(rng.uniform(0.04, 0.08) * s))
        cv2.circle(mask, (cx, cy), r, 1, -1)
        out[mask > 0] = (20, 20, 20)
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    return out, mask, kind


def _write_png(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    atomic_write_bytes(path, buf.tobytes())


def make_mvtec_like(root: str | Path, n_train: int = 24, n_test_good: int = 6, n_test_defect: int = 6, height: int = 128, width: int = 128, seed: int = 0) -> Path:
    """Write a small data set in the MVTec AD layout (train/good, test/<kind>, ground_truth/<kind>)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        _write_png(root / "train" / "good" / f"{i:03d}.png", texture(rng, height, width))
    for i in range(n_test_good):
        _write_png(root / "test" / "good" / f"{i:03d}.png", texture(rng, height, width))
    counters: dict[str, int] = {}
    for i in range(n_test_defect):
        img, mask, kind = add_defect(texture(rng, height, width), rng, ["scratch", "stain", "hole"][i % 3])
        k = counters.get(kind, 0)
        counters[kind] = k + 1
        _write_png(root / "test" / kind / f"{k:03d}.png", img)
        _write_png(root / "ground_truth" / kind / f"{k:03d}_mask.png", mask * 255)
    return root
