"""What a person looks at: ROC plots, heat-map overlays and the paper-style results table."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from .errors import StfpmError
from .fileio import atomic_path, atomic_write_bytes
from .geometry import Geometry, decode_image, decode_mask
from .metrics import image_roc
from .render import annotate, heat_overlay
from .scoring import is_anomalous

MVTEC_CATEGORIES = (
    "carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule",
    "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
)


def _figure(size: tuple[float, float]):
    """A matplotlib figure drawn off screen (no display on a line PC or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=120)


def _save(fig, path: Path) -> None:
    """Write the figure as PNG, atomically, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def roc_plot(labels: np.ndarray, scores: np.ndarray, path: Path, title: str) -> bool:
    curve = image_roc(labels, scores)
    if curve is None:
        return False
    from sklearn.metrics import auc

    fpr, tpr = curve
    fig, ax = _figure((4.5, 4.5))
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {auc(fpr, tpr):.4f}")
    ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    _save(fig, path)
    return True


def operating_plot(labels: np.ndarray, scores: np.ndarray, threshold: float | None, path: Path, title: str,
                   target_rate: float | None = None) -> bool:
    """The operating curve a line runs on: defects missed against good parts rejected, over every threshold, with the
    model's own threshold marked (where the line stands) and its target false-call rate (what it was set for)."""
    curve = image_roc(labels, scores)
    if curve is None:
        return False
    fpr, tpr = curve
    fig, ax = _figure((5.5, 4.2))
    ax.step(100 * fpr, 100 * (1 - tpr), where="post", lw=2, label="every threshold (test images)")
    if threshold is not None:
        labels, scores = np.asarray(labels), np.asarray(scores)
        flagged = is_anomalous(scores, threshold)
        fa, miss = 100 * flagged[labels == 0].mean(), 100 * (1 - flagged[labels == 1].mean())
        ax.plot([fa], [miss], "o", ms=9, c="crimson", label=f"the model's threshold: {miss:.0f} % missed, {fa:.1f} % false calls")
    if target_rate is not None:
        ax.axvline(100 * target_rate, ls="--", c="gray", lw=1, label=f"target false-call rate {100 * target_rate:g} %")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set(xlabel="good parts rejected (false calls), %", ylabel="defective parts passed (misses), %", title=title,
           xlim=(0, 100), ylim=(-2, 102))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)
    return True


def _pick(samples, n: int) -> list[int]:
    """Up to n indices spread round-robin over the defect types (good included)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[s.defect].append(i)
    picked: list[int] = []
    queues = [list(v) for _, v in sorted(groups.items())]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return sorted(picked)


def _overlay_picture(result, i: int, geometry: Geometry, threshold: float | None, max_side: int) -> np.ndarray:
    """Test image ``i`` with its heat map, its defect's outline (green) and its score and verdict written on it (BGR)."""
    s = result.samples[i]
    img = decode_image(s.path)
    h, w = img.shape[:2]
    amap = geometry.unfit_map(result.maps[i], h, w)
    vis = heat_overlay(img, amap, threshold)
    if s.mask_path is not None:
        mask = decode_mask(s.mask_path)
        if mask.shape == (h, w):
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(vis, contours, -1, (0, 255, 0), max(1, w // 300))
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        vis = cv2.resize(vis, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    score = float(result.scores[i])
    bad = None if threshold is None else bool(is_anomalous(score, threshold))
    verdict = "" if bad is None else (" ANOMALOUS" if bad else " good")
    annotate(vis, f"{s.defect} score {score:.4g}{verdict}", bad)
    return vis


def overlays(result, geometry: Geometry, threshold: float | None, out_dir: Path, n: int, max_side: int = 512) -> list[Path]:
    written = []
    for i in _pick(result.samples, n):
        s = result.samples[i]
        ok, png = cv2.imencode(".png", _overlay_picture(result, i, geometry, threshold, max_side))
        path = out_dir / f"{i:04d}_{s.defect}_{s.path.stem}.png"
        atomic_write_bytes(path, png.tobytes())
        written.append(path)
    return written


def gif(result, geometry: Geometry, threshold: float | None, path: Path, n: int = 24, max_side: int = 320, ms_per_frame: int = 900) -> bool:
    """An animated GIF of up to ``n`` test images spread over the defect types (good included), each with its heat map,
    defect outline and verdict: a category's results at a glance, as STFPM reimplementations show their demos."""
    from PIL import Image

    picked = _pick(result.samples, n)
    if not picked:
        return False
    frames = [_overlay_picture(result, i, geometry, threshold, max_side) for i in picked]
    h, w = max(f.shape[0] for f in frames), max(f.shape[1] for f in frames)  # one canvas: pictures of other sizes centred on black
    pictures = []
    for f in frames:
        canvas = np.zeros((h, w, 3), np.uint8)
        y, x = (h - f.shape[0]) // 2, (w - f.shape[1]) // 2
        canvas[y : y + f.shape[0], x : x + f.shape[1]] = f
        pictures.append(Image.fromarray(canvas[:, :, ::-1]).convert("P", palette=Image.Palette.ADAPTIVE, colors=255))
    with atomic_path(path) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=ms_per_frame, loop=0)
    return True


# ----------------------------------------------------------------------------------- results table
def load_run_metrics(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    records = []
    for d in run_dirs:
        d = Path(d)
        f = d / "metrics.json" if d.is_dir() else d
        if not f.is_file():
            raise StfpmError(f"{d}: no metrics.json (is it a run folder of stfpm-edge train or eval?)")
        try:
            records.append(json.loads(f.read_text()))
        except json.JSONDecodeError as exc:
            raise StfpmError(f"{f}: not valid JSON ({exc})") from None
    return records


# published per-category image / pixel AUROC to set beside ours (docs/results.md names the sources): the STFPM authors'
# README (ResNet-18), anomalib's STFPM (ResNet-18) and PatchCore (WRN-50) model pages; None where a source gives none
PUBLISHED: dict[str, dict[str, tuple[float | None, float | None]]] = {
    "STFPM, authors (ResNet-18)": {"bottle": (1.000, 0.988), "screw": (0.895, 0.988), "transistor": (0.939, 0.819)},
    "STFPM, anomalib (ResNet-18)": {"screw": (0.835, 0.983), "transistor": (0.853, 0.838)},
    "PatchCore, anomalib (WRN-50)": {"screw": (0.960, 0.989), "transistor": (1.000, 0.981)},
}


def _cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """One seed: the value; several: the mean and the range over seeds."""
    if not values:
        return ""
    v = [scale * x for x in values]
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def results_table(records: list[dict[str, Any]]) -> str:
    """The tables STFPM reimplementations publish, from run folders: one each for image AUROC, pixel AUROC and pixel F1
    (a row per method, the mean over categories first, then a column per category), our rows the mean and the range over
    the runs (seeds) of each reference, the published figures beside them; then AUPRO and the verdict at the tool's own
    threshold (defects passed, good parts rejected on the test set)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r.get("reference", "student"), r.get("category", "?"))].append(r)
    cats = sorted({c for _, c in groups}, key=lambda c: (MVTEC_CATEGORIES.index(c) if c in MVTEC_CATEGORIES else 99, c))
    refs = sorted({ref for ref, _ in groups}, key=lambda ref: ref != "memory")
    seeds = {ref: max(len(groups.get((ref, c), [])) for c in cats) for ref in refs}
    label = {ref: f"stfpm-edge, {ref}" + (" (default)" if ref == "memory" else "") + f", {seeds[ref]} run{'s' if seeds[ref] > 1 else ''}"
             for ref in refs}
    out = []
    for title, key, pub in (("Image AUROC", "image_auroc", 0), ("Pixel AUROC", "pixel_auroc", 1), ("Pixel F1", "pixel_f1", None)):
        out += [f"**{title}**", "", "| method | mean | " + " | ".join(cats) + " |", "|---|" + "---|" * (len(cats) + 1)]
        for ref in refs:
            per = [[r[key] for r in groups.get((ref, c), []) if r.get(key) is not None] for c in cats]
            means = [float(np.mean(v)) for v in per if v]
            mean = f"{np.mean(means):.3f}" if means and len(means) == len(cats) else ""  # a mean over some categories compares with nothing
            out.append(f"| {label[ref]} | {mean} | " + " | ".join(_cell(v) for v in per) + " |")
        if pub is not None:
            for name, figures in PUBLISHED.items():
                vals = [figures.get(c, (None, None))[pub] for c in cats]
                known = [v for v in vals if v is not None]
                mean = f"{np.mean(known):.3f}" if len(known) == len(cats) else ""
                out.append(f"| {name} | {mean} | " + " | ".join("" if v is None else f"{v:.3f}" for v in vals) + " |")
        out.append("")
    out += ["**At the tool's own threshold** (set from good images only; test set: defective images passed, good images rejected)", "",
            "| method | " + " | ".join(f"{c} AUPRO | {c} passed | {c} rejected" for c in cats) + " |", "|---|" + "---|" * (3 * len(cats))]
    for ref in refs:
        cells = []
        for c in cats:
            runs = groups.get((ref, c), [])
            n_bad = runs[0].get("n_anomalous", 0) if runs else 0
            n_good = runs[0].get("n_images", 0) - n_bad if runs else 0
            cells.append(_cell([r["aupro"] for r in runs if r.get("aupro") is not None]))
            cells.append(_cell([r["miss_rate"] for r in runs if r.get("miss_rate") is not None], 100, 0) + (" %" if runs else ""))
            flagged = [str(r.get("good_flagged", round((r.get("false_alarm_rate") or 0) * n_good))) for r in runs]
            cells.append(f"{' / '.join(flagged)} of {n_good}" if runs else "")
        out.append(f"| {label[ref]} | " + " | ".join(cells) + " |")
    return "\n".join(line for line in out) + "\n"
