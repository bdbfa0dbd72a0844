"""The testbed's statistics: area under a curve, rollouts-to-target with censoring, paired bootstrap CIs.

Everything is plain Python (no numpy), deterministic, and checked against hand-computed cases in
``tests/test_stats.py``.

* :func:`area` — the area under expected reward vs rollouts (trapezoid from the warm start, 0 rollouts, to the
  budget), divided by the budget: the mean expected reward over training, in reward units.
* :func:`first_reach` — rollouts at the first point of a curve at or above a target. A curve that never gets
  there is *censored at the budget*: the value is the budget and ``reached`` is False (flagged, never dropped,
  so means are not biased by survivorship; a censored value under-states the true cost).
* :func:`paired_bootstrap` — a percentile bootstrap 95% CI of a statistic of paired per-seed values (the same
  resampled seeds for both arms), with a fixed bootstrap seed; :func:`ratio_of_means` and
  :func:`diff_of_means` are the two statistics the report uses (a ratio of means, not a mean of ratios).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["area", "first_reach", "Reach", "paired_bootstrap", "matched_bootstrap", "ratio_of_means", "diff_of_means",
           "fraction_of_gain", "Estimate",
           "BOOTSTRAP_SEED", "BOOTSTRAP_RESAMPLES"]

#: Fixed seed and number of resamples of every bootstrap in the report (so the CIs reproduce bit-exactly).
BOOTSTRAP_SEED = 20261201
BOOTSTRAP_RESAMPLES = 2000


def area(x: Sequence[float], y: Sequence[float]) -> float:
    """Trapezoid area under ``y(x)`` divided by the x-range (the curve's mean height). Needs >= 2 points and a
    strictly increasing ``x``."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"area: need two equally long sequences of >= 2 points, got {len(x)} and {len(y)}")
    tot = 0.0
    for i in range(1, len(x)):
        dx = x[i] - x[i - 1]
        if dx <= 0:
            raise ValueError("area: x must be strictly increasing")
        tot += dx * (y[i] + y[i - 1]) / 2.0
    return tot / (x[-1] - x[0])


@dataclass(frozen=True)
class Reach:
    """``value``: rollouts at the first point at or above the target, or the budget when never reached
    (``reached`` False: censored)."""

    value: float
    reached: bool


def first_reach(x: Sequence[float], y: Sequence[float], target: float, budget: float) -> Reach:
    """First ``x[i]`` with ``y[i] >= target``; censored at ``budget`` if there is none."""
    for xi, yi in zip(x, y):
        if yi >= target:
            return Reach(float(xi), True)
    return Reach(float(budget), False)


def ratio_of_means(a: Sequence[float], b: Sequence[float]) -> float:
    """``mean(a) / mean(b)`` (NaN when ``mean(b)`` is 0)."""
    mb = statistics.fmean(b)
    return statistics.fmean(a) / mb if mb else float("nan")


def diff_of_means(a: Sequence[float], b: Sequence[float]) -> float:
    """``mean(a) - mean(b)``."""
    return statistics.fmean(a) - statistics.fmean(b)


def fraction_of_gain(arm: Sequence[float], base: Sequence[float], ceiling: Sequence[float]) -> float:
    """``(mean(arm) - mean(base)) / (mean(ceiling) - mean(base))``: the share of the ceiling's gain over ``base``
    that ``arm`` gets (NaN when the ceiling gains nothing)."""
    d = statistics.fmean(ceiling) - statistics.fmean(base)
    return (statistics.fmean(arm) - statistics.fmean(base)) / d if d else float("nan")


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its paired-bootstrap 95% CI."""

    value: float
    lo: float
    hi: float
    n: int

    def fmt(self, spec: str = ".2f") -> str:
        if math.isnan(self.value):
            return "-"
        return f"{format(self.value, spec)} [{format(self.lo, spec)}, {format(self.hi, spec)}]"


def _percentile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an ascending list, q in [0, 1]."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    stat: Callable[[Sequence[float], Sequence[float]], float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> Estimate:
    """``stat(a, b)`` and its percentile bootstrap CI, resampling the *pairs* ``(a[i], b[i])`` (same seeds).

    Resamples whose statistic is not finite (e.g. a zero denominator) are left out of the percentiles.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap: need two equally long non-empty sequences, got {len(a)} and {len(b)}")
    return matched_bootstrap([a, b], stat, resamples=resamples, seed=seed, level=level)


def matched_bootstrap(
    columns: Sequence[Sequence[float]],
    stat: Callable[..., float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> Estimate:
    """``stat(*columns)`` and its percentile bootstrap CI, resampling the seeds: row ``i`` of every column together
    (e.g. an arm, naive and the oracle on the same seed). :func:`paired_bootstrap` is the two-column case."""
    n = len(columns[0]) if columns else 0
    if not columns or not n or any(len(c) != n for c in columns):
        raise ValueError("matched_bootstrap: need equally long non-empty columns, got "
                         f"{[len(c) for c in columns]}")
    point = stat(*columns)
    rng = random.Random(seed)
    vals = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        v = stat(*[[c[i] for i in idx] for c in columns])
        if math.isfinite(v):
            vals.append(v)
    if not vals:
        return Estimate(point, float("nan"), float("nan"), n)
    vals.sort()
    alpha = (1.0 - level) / 2.0
    return Estimate(point, _percentile(vals, alpha), _percentile(vals, 1.0 - alpha), n)
