"""Metrics on cases whose answer is known."""

import numpy as np
import pytest

from stfpm_edge.metrics import aupro, best_f1, evaluate_scores
from stfpm_edge.scoring import normalized_score
from stfpm_edge.thresholds import threshold_from_normal


def test_image_auroc_known_cases():
    labels = np.array([0, 0, 0, 1, 1])
    perfect = evaluate_scores(labels, np.array([0.1, 0.2, 0.3, 0.8, 0.9]), None, None, None, None, 0.5)
    assert perfect["image_auroc"] == 1.0
    assert perfect["image_f1"] == 1.0
    inverted = evaluate_scores(labels, np.array([0.9, 0.8, 0.7, 0.1, 0.2]), None, None, None, None, 0.5)
    assert inverted["image_auroc"] == 0.0
    # one swap out of 6 pairs: AUROC = 5/6
    one_swap = evaluate_scores(labels, np.array([0.1, 0.2, 0.85, 0.8, 0.9]), None, None, None, None, None)
    assert one_swap["image_auroc"] == pytest.approx(5 / 6)


def test_single_class_test_set_gives_null_with_reason():
    m = evaluate_scores(np.zeros(4), np.arange(4.0), None, None, None, None, 1.5)
    assert m["image_auroc"] is None
    assert any("only one class" in n for n in m["notes"])


def test_best_f1_known():
    # best threshold keeps the two positives and one negative: P = 2/3, R = 1 -> F1 = 0.8
    assert best_f1(np.array([0, 0, 1, 1]), np.array([0.1, 0.7, 0.6, 0.9])) == pytest.approx(0.8)


def test_aupro_perfect_and_useless_maps():
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 8:14, 3:5] = True
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=1e-3)
    assert aupro(np.zeros((2, 16, 16), np.float32), masks) == pytest.approx(0.0, abs=1e-6)


def test_aupro_averages_regions_not_pixels():
    # two regions: a big one fully detected, a small one never; PRO = 0.5 at every FPR
    masks = np.zeros((1, 32, 32), bool)
    masks[0, 0:10, 0:10] = True  # 100 px
    masks[0, 20:22, 20:22] = True  # 4 px
    maps = np.random.default_rng(0).uniform(0, 0.5, (1, 32, 32)).astype(np.float32)
    maps[0, 0:10, 0:10] = 1.0
    maps[0, 20:22, 20:22] = -1.0
    assert aupro(maps, masks) == pytest.approx(0.5, abs=0.01)


def test_pixel_metrics_use_only_labelled_images_and_valid_pixels():
    labels = np.array([0, 1, 1])
    maps = np.zeros((3, 8, 8), np.float32)
    masks = np.zeros((3, 8, 8), np.uint8)
    masks[1, 2:4, 2:4] = 1
    maps[1, 2:4, 2:4] = 5.0
    maps[2] = 100.0  # an unlabelled defect image with a huge map: must not count
    has = np.array([True, True, False])
    m = evaluate_scores(labels, maps.reshape(3, -1).max(1), maps, masks, has, None, 1.0)
    assert m["pixel_auroc"] == 1.0
    assert m["pixel_f1"] == 1.0
    assert any("no mask" in n for n in m["notes"])


def test_threshold_from_normal_scores():
    scores = np.arange(101, dtype=float)  # 0..100
    assert threshold_from_normal(scores, 0.99) == pytest.approx(99.0)
    assert threshold_from_normal(scores, 1.0) == 100.0
    assert float(normalized_score(99.0, 99.0)) == pytest.approx(0.5)
    assert float(normalized_score(1000.0, 99.0)) == 1.0
