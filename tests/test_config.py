"""dgg_fused.config: GateConfig validation, numpy numbers, the shared codes."""

from __future__ import annotations

import dataclasses

import pytest
import numpy as np

from dgg_fused import GateConfig
from dgg_fused.config import STATISTICS, Reference, Statistic


@pytest.mark.parametrize(
    "field,value",
    [
        ("window", 1), ("window", 0), ("window", 2.5), ("window", True), ("window", 10**6),
        ("tau", 0), ("tau", -0.1), ("tau", float("nan")), ("tau", float("inf")), ("tau", "0.3"), ("tau", True),
        ("tau", 1e39), ("drift_threshold", 3.5e38), ("action", "scale"), ("action", None),
        ("max_reuse", 0), ("max_reuse", 1.0),
        ("statistic", "zscore"), ("reference", "first"),
        ("std_floor", -1e-3), ("std_floor", 1.0), ("std_floor", None),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"GateConfig\.{field}"):
        GateConfig(**{field: value})


def test_defaults_frozen_and_round_trip():
    c = GateConfig()
    assert c.max_reuse == 4 and 0.1 <= c.tau <= 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.tau = 1.0  # type: ignore[misc]
    c2 = GateConfig(window=5, tau=1, statistic="both", reference="all")
    assert isinstance(c2.tau, float)
    assert GateConfig.from_dict(c2.to_dict()) == c2
    with pytest.raises(ValueError, match="unknown field"):
        GateConfig.from_dict({**c2.to_dict(), "alpha": 1})


def test_numpy_numbers_are_accepted_like_python_ones():
    c = GateConfig(window=np.int64(5), tau=np.float32(0.5), max_reuse=np.int32(3), std_floor=np.float64(0.01))
    assert c == GateConfig(window=5, tau=0.5, max_reuse=3, std_floor=0.01)
    assert type(c.window) is int and type(c.tau) is float
    assert GateConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="GateConfig.window"):
        GateConfig(window=np.bool_(True))
    with pytest.raises(ValueError, match="GateConfig.window"):
        GateConfig(window=np.float64(4.0))


def test_shared_codes_follow_the_name_tuples():
    assert [int(s) for s in Statistic] == list(range(len(STATISTICS)))
    assert GateConfig(statistic="both", reference="accepted").statistic_code is Statistic.BOTH
    assert GateConfig(statistic="both", reference="accepted").reference_code is Reference.ACCEPTED


def test_thresholds_beyond_float32_are_refused():
    """Regression (issue 17, edge 5): tau=1e39 is finite in Python but +inf in float32, where the gate compares;
    a NaN energy (z = +inf) was then not gated and reached the weights. The largest float32 itself is allowed."""
    import torch

    from dgg_fused import GatedOptimizer
    from helpers import batch, loss_fn, make_model

    for name in ("tau", "drift_threshold"):
        with pytest.raises(ValueError, match=rf"GateConfig\.{name} must be > 0 and at most the largest float32"):
            GateConfig(**{name: 1e39}, **({"drift": "approx_kl"} if name == "drift_threshold" else {}))
    big = GateConfig(window=2, tau=float(torch.finfo(torch.float32).max))
    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head, config=big)
    for k, seed in ((1, 0), (1, 1), (2, 2)):  # the window fills on two first passes; a reuse pass with a NaN
        opt.set_reuse_index(1 if k == 1 else 2)
        loss_fn(model, batch(seed)).backward()
        if k == 2:
            model.lm_head.weight.grad[0, 0] = float("nan")
        opt.step()
        opt.zero_grad()
    assert opt.get_metrics()["gated"] == 1.0  # z = +inf > the largest float32: gated, the NaN never reaches a weight
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kw,field", [
    ({"drift_threshold": 0.1}, "drift_threshold"),                # no drift statistic: nothing reads it
    ({"drift_rule": "zscore"}, "drift_rule"),
    ({"combine": "all"}, "combine"),
    ({"energy": False, "drift": "approx_kl", "tau": 0.1}, "tau"),  # a drift-only threshold gate never reads tau
    ({"energy": False, "drift": "approx_kl", "statistic": "both"}, "statistic"),
    ({"energy": False, "drift": "approx_kl", "reference": "all"}, "reference"),
    ({"energy": False, "drift": "approx_kl", "combine": "all"}, "combine"),  # nothing to combine with
    ({"drift": "approx_kl", "drift_rule": "zscore", "drift_threshold": 0.5}, "drift_threshold"),
])
def test_settings_the_rule_never_reads_are_refused(kw, field):
    """Regression (issue 17, edge 6): they were accepted and did nothing."""
    with pytest.raises(ValueError, match=rf"GateConfig\.{field}=.* does nothing here"):
        GateConfig(**kw)


def test_settings_the_rule_reads_are_accepted():
    with pytest.raises(ValueError, match="tau"):
        GateConfig.recommended(tau=0.1)
    GateConfig.recommended(window=16, max_reuse=8, action="watch")  # window sizes the state: always allowed
    GateConfig(drift="approx_kl", drift_rule="zscore", tau=0.5, reference="all", combine="all")
    GateConfig(energy=False, drift="clip_frac", drift_rule="zscore", tau=2.0, std_floor=0.0)
