"""The operating threshold, from good images only: a target false-call rate turned into a score.

A quality engineer states the share of good parts the line may reject (``false_call_rate``, e.g.
0.005 = 1 in 200). The threshold is the score that good parts exceed at that rate, estimated from
the image scores of good images the reference did not learn (out-of-fold: for a memory, each
training image scored with its own rows left out of the search, plus the held-out splits; for a
student, its validation and calibration splits). No defect image is used.

Rules (``THRESHOLD_RULES``):

- ``tail`` (default): peaks over a threshold. The scores above the empirical quantile at
  ``1 - TAIL_SHARE`` are fitted with a generalised Pareto distribution (extreme-value theory:
  the excesses over a high level of almost any distribution follow one), and the threshold is its
  quantile at the target rate. It extrapolates beyond the highest good score where the sample is
  too small to hold the rate, instead of resting on the maximum of a few dozen numbers.
- ``quantile``: the empirical quantile at ``1 - false_call_rate`` (linear interpolation): with
  fewer than about ``1 / false_call_rate`` scores it is in effect their maximum.

Either way the uncertainty is reported: the 5-95 % range of the threshold over bootstrap
resamples of the good scores. With fewer than ``MIN_TAIL_SCORES`` good scores no tail can be
fitted; the threshold is then the highest good score, and the rule says so.
The verdict rule and the normalised score are in ``scoring`` (run side).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import StfpmError

THRESHOLD_RULES = ("tail", "quantile")
DEFAULT_FALSE_CALL_RATE = 0.01
TAIL_SHARE = 0.2  # the share of the highest good scores the tail is fitted to
MIN_TAIL_SCORES = 20  # below this many good scores there are too few excesses (4) to fit a tail
BOOTSTRAP = 200


def check_false_call_rate(rate: float) -> float:
    rate = float(rate)
    if not 0.0 < rate < 0.5:
        raise StfpmError(f"false-call rate must be between 0 and 0.5 (a share of good parts, e.g. 0.005 = 1 in 200), got {rate}")
    return rate


def _tail_quantile(scores: np.ndarray, rate: float) -> float:
    """The peaks-over-threshold estimate of the score good parts exceed at ``rate`` (``scores`` sorted)."""
    from scipy.stats import genpareto

    n = scores.size
    m = max(5, int(round(TAIL_SHARE * n)))
    level = float(scores[n - m - 1])  # the excesses are the m scores above this one
    if rate >= m / n:  # the rate lies inside the body of the sample: no extrapolation needed
        return float(np.quantile(scores, 1.0 - rate))
    excess = scores[n - m :] - level
    if np.ptp(excess) <= 0:
        return float(scores[-1])
    shape, _, scale = genpareto.fit(excess, floc=0.0)
    if not -0.5 <= shape <= 0.5:  # beyond these a few dozen excesses cannot tell the shape apart: the scale refitted at the bound
        shape = float(np.clip(shape, -0.5, 0.5))
        _, _, scale = genpareto.fit(excess, f0=shape, floc=0.0)
    return level + float(genpareto.ppf(1.0 - rate * n / m, shape, loc=0.0, scale=scale))


def threshold_for(scores: np.ndarray, rule: str, rate: float) -> float:
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if rule == "quantile":
        return float(np.quantile(s, 1.0 - rate))
    if rule == "tail":
        return _tail_quantile(s, rate)
    raise StfpmError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")


def fit_threshold(scores: np.ndarray, false_call_rate: float = DEFAULT_FALSE_CALL_RATE, rule: str = "tail", seed: int = 0) -> dict[str, Any]:
    """The threshold for ``false_call_rate`` from good images' out-of-fold ``scores``, with its bootstrap range.

    Returns the checkpoint's ``threshold`` entry: ``image`` (the threshold), ``rule``, ``false_call_rate``,
    ``n_scores``, ``range_90`` (5th and 95th percentiles over resamples) and ``text`` (the rule in words).
    """
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise StfpmError("no good images the reference did not learn: cannot set a threshold without defect images")
    rate = check_false_call_rate(false_call_rate)
    if rule not in THRESHOLD_RULES:
        raise StfpmError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")
    entry: dict[str, Any] = {"rule": rule, "false_call_rate": rate, "n_scores": int(s.size)}
    if s.size < MIN_TAIL_SCORES:
        value = float(s.max())
        entry.update(image=value, range_90=[value, value], rule="max", warning=(
            f"only {s.size} good images the reference did not learn: the threshold is their highest score; a false-call rate "
            f"needs at least {MIN_TAIL_SCORES} (train with more good images)"))
        entry["text"] = f"highest of {s.size} out-of-fold good image scores (too few for a tail fit)"
        return entry
    value = threshold_for(s, rule, rate)
    rng = np.random.default_rng(seed)
    boot = [threshold_for(rng.choice(s, s.size), rule, rate) for _ in range(BOOTSTRAP)]
    lo, hi = (float(v) for v in np.quantile(boot, [0.05, 0.95]))
    entry.update(image=float(value), range_90=[lo, hi], share_above=float((s > value).mean()))
    how = "generalised Pareto tail fitted to the top 20 %" if rule == "tail" else "empirical quantile"
    entry["text"] = f"false-call rate {rate:g} on {s.size} out-of-fold good image scores ({how}); 90 % range {lo:.4g}-{hi:.4g}"
    return entry


def refit_threshold(meta: dict[str, Any], scores, false_call_rate: float | None = None, rule: str | None = None,
                    sources: str | None = None) -> dict[str, Any]:
    """A trained model's threshold set again (``stfpm-edge threshold``, ``stfpm-edge update``): ``fit_threshold`` on ``scores``
    with the model's own rate, rule and seed unless given, the sources named, the entry it replaces kept in ``history``."""
    old = meta.get("threshold") or {}
    rate = false_call_rate if false_call_rate is not None else old.get("false_call_rate", DEFAULT_FALSE_CALL_RATE)
    rule = rule or (old.get("rule") if old.get("rule") in THRESHOLD_RULES else "tail")  # "max" (too few scores) refits by the tail
    entry = fit_threshold(scores, rate, rule, int((meta.get("config") or {}).get("seed", 0)))
    entry["sources"] = sources or old.get("sources", "the checkpoint's held-out good scores")
    entry["history"] = [*old.get("history", []), {k: old.get(k) for k in ("image", "rule", "false_call_rate")}]
    return entry


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


def operating_points(labels: np.ndarray, scores: np.ndarray, rates=(0.001, 0.01, 0.05)) -> list[dict[str, float]]:
    """For reporting only (uses the test set's defects): the share of defects missed when the threshold is set so that at most
    each ``rate`` of the test's good images is flagged."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    good, bad = np.sort(scores[labels == 0]), scores[labels == 1]
    out = []
    if good.size == 0 or bad.size == 0:
        return out
    for rate in rates:
        allowed = int(np.floor(rate * good.size))  # good images that may lie above the threshold
        thr = good[good.size - 1 - allowed]
        out.append({"false_call_rate": float(rate), "good_flagged": int((good > thr).sum()), "threshold": float(thr),
                    "miss_rate": float((bad <= thr).mean())})
    return out
