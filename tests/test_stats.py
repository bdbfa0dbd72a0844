"""The testbed's statistics against hand-computed cases: area, censoring, ratio of means, paired bootstrap."""

import math

import pytest

from dgg_fused.demo.stats import (
    BOOTSTRAP_SEED,
    Reach,
    area,
    diff_of_means,
    first_reach,
    paired_bootstrap,
    ratio_of_means,
)


def test_area_hand_cases():
    assert area([0, 1], [0.0, 1.0]) == 0.5
    # trapezoids 0..64: (0.2+0.4)/2*64 = 19.2; 64..192: (0.4+0.6)/2*128 = 64; total 83.2 over 192
    assert area([0, 64, 192], [0.2, 0.4, 0.6]) == pytest.approx(83.2 / 192)
    assert area([0, 10, 20], [0.3, 0.3, 0.3]) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        area([0], [1.0])
    with pytest.raises(ValueError):
        area([0, 0], [1.0, 1.0])


def test_first_reach_and_censoring():
    x = [0, 64, 128, 192]
    assert first_reach(x, [0.1, 0.2, 0.5, 0.4], 0.45, 192) == Reach(128.0, True)
    assert first_reach(x, [0.1, 0.2, 0.45, 0.4], 0.45, 192) == Reach(128.0, True)  # >= counts
    # never reached: censored at the budget, flagged
    assert first_reach(x, [0.1, 0.2, 0.3, 0.4], 0.45, 192) == Reach(192.0, False)
    # a frozen curve never reaches a target above its start
    assert not first_reach(x, [0.3] * 4, 0.3 + 1e-9, 192).reached


def test_ratio_of_means_is_not_mean_of_ratios():
    a, b = [1.0, 3.0], [1.0, 1.0]
    assert ratio_of_means(a, b) == 2.0
    assert ratio_of_means([100.0, 300.0], [200.0, 100.0]) == pytest.approx(400 / 300)  # mean of ratios: 1.75
    assert math.isnan(ratio_of_means([1.0], [0.0]))
    assert diff_of_means([1.0, 2.0], [0.5, 0.5]) == 1.0


def test_paired_bootstrap_hand_cases():
    # constant paired differences: every resample gives the same value, the CI collapses onto it
    e = paired_bootstrap([1.0, 2.0, 3.0], [0.5, 1.5, 2.5], diff_of_means)
    assert e.n == 3 and (e.value, e.lo, e.hi) == pytest.approx((0.5, 0.5, 0.5), abs=1e-15)
    # two seeds, differences 1 and 2: resample means are 1 (p=1/4), 1.5 (1/2), 2 (1/4); the 2.5% and 97.5%
    # percentiles of 2000 resamples are therefore 1 and 2
    e = paired_bootstrap([1.0, 2.0], [0.0, 0.0], diff_of_means)
    assert (e.value, e.lo, e.hi) == (1.5, 1.0, 2.0)
    # pairing: the same resampled seeds for both arms (an unpaired bootstrap would give a wide CI here)
    a = [10.0, 20.0, 30.0, 40.0]
    e = paired_bootstrap(a, [x - 1.0 for x in a], diff_of_means)
    assert (e.lo, e.hi) == pytest.approx((1.0, 1.0), abs=1e-12)
    # fixed bootstrap seed: reproducible; another seed gives (slightly) other ends
    xs, ys = [0.3, 0.5, 0.2, 0.9, 0.4], [0.2, 0.6, 0.1, 0.5, 0.4]
    assert paired_bootstrap(xs, ys, diff_of_means) == paired_bootstrap(xs, ys, diff_of_means, seed=BOOTSTRAP_SEED)
    e = paired_bootstrap(xs, ys, diff_of_means)
    assert e.lo <= e.value <= e.hi
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0], diff_of_means)


def test_fraction_of_gain_and_the_matched_bootstrap():
    from dgg_fused.demo.stats import fraction_of_gain, matched_bootstrap, paired_bootstrap, diff_of_means

    arm, base, ceil = [0.5, 0.6, 0.7], [0.4, 0.4, 0.5], [0.8, 0.8, 0.9]
    # (0.6 - 0.4333) / (0.8333 - 0.4333)
    assert fraction_of_gain(arm, base, ceil) == pytest.approx((0.6 - 1.3 / 3) / (2.5 / 3 - 1.3 / 3))
    assert math.isnan(fraction_of_gain(arm, base, base))
    est = matched_bootstrap([arm, base, ceil], fraction_of_gain)
    assert est.lo <= est.value <= est.hi and est.n == 3
    # the two-column case is paired_bootstrap, resample for resample
    assert matched_bootstrap([arm, base], diff_of_means) == paired_bootstrap(arm, base, diff_of_means)
    with pytest.raises(ValueError):
        matched_bootstrap([arm, base[:2]], diff_of_means)
