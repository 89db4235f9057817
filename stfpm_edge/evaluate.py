"""Evaluation of any engine on a data set's test split: scores, maps, metrics and report files."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .datasets import Dataset, Sample, content_mask, load_images, load_masks
from .fileio import atomic_write_json, atomic_write_text
from .geometry import Geometry
from .metrics import evaluate_scores
from .scoring import is_anomalous, normalized_score, verdict

InferFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def predict(infer: InferFn, images: np.ndarray, batch_size: int = 8, progress: bool = False, desc: str = "inferring"):
    """Run ``infer`` over uint8 frames in batches -> (maps [N,H,W], scores [N])."""
    maps, scores = [], []
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for i in starts:
        m, s = infer(images[i : i + batch_size])
        maps.append(np.asarray(m, dtype=np.float32))
        scores.append(np.asarray(s, dtype=np.float32))
    if not maps:
        return np.zeros((0,) + images.shape[1:3], np.float32), np.zeros(0, np.float32)
    return np.concatenate(maps), np.concatenate(scores)


@dataclass
class EvalResult:
    samples: list[Sample]
    sizes: list[tuple[int, int]]
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    metrics: dict[str, Any]


@dataclass
class TestSet:
    """Test images fitted to the model, with everything the metrics need."""

    images: np.ndarray
    sizes: list[tuple[int, int]]
    masks: np.ndarray
    has_mask: np.ndarray
    labels: np.ndarray
    valid: np.ndarray | None  # content pixels; None for squash (all pixels)

    @classmethod
    def load(cls, samples: list[Sample], geometry: Geometry, progress: bool) -> "TestSet":
        images, sizes = load_images(samples, geometry, progress=progress, desc="test images")
        masks, has_mask = load_masks(samples, sizes, geometry)
        valid = content_mask(geometry, sizes) if geometry.resize != "squash" else None
        return cls(images, sizes, masks, has_mask, np.array([s.label for s in samples]), valid)

    def metrics(self, maps: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict[str, Any]:
        return evaluate_scores(self.labels, scores, maps, self.masks, self.has_mask, self.valid, threshold)


def evaluate(infer: InferFn, samples: list[Sample], geometry: Geometry, threshold: float | None, progress: bool = True) -> EvalResult:
    if not samples:
        metrics = evaluate_scores(np.zeros(0), np.zeros(0), None, None, None, None, threshold)
        metrics["notes"].append("the data set has no test images")
        return EvalResult([], [], np.zeros(0), np.zeros((0, geometry.height, geometry.width)), np.zeros((0, geometry.height, geometry.width)), metrics)
    test = TestSet.load(samples, geometry, progress)
    maps, scores = predict(infer, test.images, progress=progress, desc="evaluating")
    return EvalResult(samples, test.sizes, scores, maps, test.masks, test.metrics(maps, scores, threshold))


def scores_csv(result: EvalResult, threshold: float | None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "defect", "label", "score", "normalized_score", "verdict"])
    for s, score in zip(result.samples, result.scores):
        if threshold is None:
            norm = ""
        else:
            norm = f"{float(normalized_score(score, threshold)):.6f}"
            label = verdict(score, threshold)
        w.writerow([str(s.path), s.defect, s.label, f"{float(score):.8g}", norm, label if threshold is not None else ""])
    return buf.getvalue()


def write_outputs(result: EvalResult, out_dir: Path, geometry: Geometry, threshold: float | None, dataset: Dataset, n_overlays: int,
                  extra: dict[str, Any] | None = None, target_rate: float | None = None) -> dict[str, Any]:
    """metrics.json, scores.csv, roc.png, operating.png (misses against false calls, ``target_rate`` marked) and overlays/
    in ``out_dir``; returns the metrics record."""
    from . import report

    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"category": dataset.name, "layout": dataset.layout, "data": str(dataset.root), **(extra or {}), **result.metrics}
    atomic_write_text(out_dir / "scores.csv", scores_csv(result, threshold))
    labels = np.array([s.label for s in result.samples])
    report.roc_plot(labels, result.scores, out_dir / "roc.png", title=f"{dataset.name}: image ROC")
    report.operating_plot(labels, result.scores, threshold, out_dir / "operating.png", f"{dataset.name}: misses against false calls",
                          target_rate)
    report.overlays(result, geometry, threshold, out_dir / "overlays", n_overlays)
    atomic_write_json(out_dir / "metrics.json", record)
    return record


def compare_engines(engines: dict[str, InferFn], samples: list[Sample], geometry: Geometry, threshold: float | None, reference: str, progress: bool = True) -> dict[str, Any]:
    """Run several engines on the same test images; metrics for each and differences to ``reference``."""
    test = TestSet.load(samples, geometry, progress)
    outputs, report = {}, {"n_images": len(samples), "reference": reference, "engines": {}}
    for name, infer in engines.items():
        maps, scores = predict(infer, test.images, progress=progress, desc=name)
        outputs[name] = (maps, scores)
        report["engines"][name] = {"metrics": test.metrics(maps, scores, threshold)}
    ref_maps, ref_scores = outputs[reference]
    ref_metrics = report["engines"][reference]["metrics"]
    for name, (maps, scores) in outputs.items():
        if name == reference:
            continue
        entry = report["engines"][name]
        entry["max_abs_map_diff"] = float(np.abs(maps - ref_maps).max())
        entry["max_abs_score_diff"] = float(np.abs(scores - ref_scores).max())
        entry["max_rel_score_diff"] = float((np.abs(scores - ref_scores) / np.maximum(np.abs(ref_scores), 1e-12)).max())
        if threshold is not None:
            entry["verdict_flips"] = int((is_anomalous(scores, threshold) != is_anomalous(ref_scores, threshold)).sum())
        for key in ("image_auroc", "pixel_auroc", "pixel_f1", "aupro"):
            a, b = entry["metrics"].get(key), ref_metrics.get(key)
            entry[f"delta_{key}"] = None if a is None or b is None else a - b
    report["map_range"] = [float(ref_maps.min()), float(ref_maps.max())]
    return report
