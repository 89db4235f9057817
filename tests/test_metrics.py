"""Metrics on cases whose answer is known."""

import numpy as np
import pytest

from stfpm_edge.errors import StfpmError
from stfpm_edge.metrics import aupro, best_f1, evaluate_scores
from stfpm_edge.scoring import normalized_score
from stfpm_edge.thresholds import MIN_TAIL_SCORES, fit_threshold, operating_points


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


def test_the_normalised_score_is_one_half_at_the_threshold():
    assert float(normalized_score(99.0, 99.0)) == pytest.approx(0.5)
    assert float(normalized_score(1000.0, 99.0)) == 1.0


def test_a_false_call_rate_becomes_the_threshold_good_parts_exceed_at_that_rate():
    rng = np.random.default_rng(0)
    truth = 1.0 + rng.gamma(4.0, 0.05, size=2_000_000)  # a skewed good-score distribution, known to many digits
    want = float(np.quantile(truth, 1 - 0.005))
    # 300 good scores: the tail fit lands near the true 99.5 % point, and its bootstrap range holds it
    errors = []
    for seed in range(6):
        sample = 1.0 + rng.gamma(4.0, 0.05, size=300)
        entry = fit_threshold(sample, 0.005, "tail", seed)
        errors.append(entry["image"] - want)
        assert entry["n_scores"] == 300 and entry["rule"] == "tail" and entry["range_90"][0] <= entry["image"] <= entry["range_90"][1]
    assert abs(float(np.median(errors))) < 0.03 * want
    # 40 good scores and a rate of 1 in 1000: the empirical quantile is their maximum, the tail fit goes beyond it
    small = 1.0 + rng.gamma(4.0, 0.05, size=40)
    assert fit_threshold(small, 0.001, "quantile")["image"] <= small.max()
    assert fit_threshold(small, 0.001, "tail")["image"] > small.max()


def test_too_few_good_scores_fall_back_to_their_maximum_and_say_how_many_are_needed():
    entry = fit_threshold(np.arange(MIN_TAIL_SCORES - 1, dtype=float), 0.005)
    assert entry["image"] == MIN_TAIL_SCORES - 2 and entry["rule"] == "max" and f"at least {MIN_TAIL_SCORES}" in entry["warning"]
    with pytest.raises(StfpmError, match="false-call rate"):
        fit_threshold(np.arange(100, dtype=float), 0.7)
    with pytest.raises(StfpmError, match="no good images"):
        fit_threshold(np.zeros(0), 0.01)


def test_operating_points_report_misses_at_false_call_rates_on_the_test_set():
    labels = np.array([0] * 100 + [1] * 10)
    scores = np.concatenate([np.arange(100, dtype=float), np.arange(95, 105, dtype=float)])
    points = {p["false_call_rate"]: p for p in operating_points(labels, scores)}
    assert points[0.001]["good_flagged"] == 0 and points[0.001]["miss_rate"] == pytest.approx(0.5)  # 95..99 pass
    assert points[0.05]["good_flagged"] == 5 and points[0.05]["miss_rate"] == 0.0  # threshold 94: every defect above