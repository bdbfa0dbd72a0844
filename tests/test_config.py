"""dgg_fused.config: GateConfig validation, numpy numbers, the shared codes."""

from __future__ import annotations

import dataclasses

import pytest
import numpy as np

from dgg_fused import GateConfig
from dgg_fused.config import REFERENCES, STATISTICS, Reference, Statistic


@pytest.mark.parametrize(
    "field,value",
    [
        ("window", 1), ("window", 0), ("window", 2.5), ("window", True), ("window", 10**6),
        ("tau", 0), ("tau", -0.1), ("tau", float("nan")), ("tau", float("inf")), ("tau", "0.3"), ("tau", True),
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
    assert [s.name.lower() for s in Statistic] == list(STATISTICS)
    assert [r.name.lower() for r in Reference] == list(REFERENCES)
    assert GateConfig(statistic="both", reference="accepted").statistic_code is Statistic.BOTH
    assert GateConfig(statistic="both", reference="accepted").reference_code is Reference.ACCEPTED
