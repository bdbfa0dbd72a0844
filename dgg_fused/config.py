"""GateConfig: the knobs of the Dynamic Gradient Gating rule.

Every field is validated in ``__post_init__``; a bad value raises ``ValueError`` naming the field and the
allowed range, so a typo in a launch script fails at construction time instead of silently training ungated.
The exact rule these fields parameterise is written down in ``docs/rule.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

__all__ = ["GateConfig", "STATISTICS", "REFERENCES"]

#: What the Z-score is taken of. ``"energy"``: the lm_head gradient energy E_t = ||g_t||^2.
#: ``"increment"``: its step-wise increment E_t - E_{t-1}. ``"both"``: the larger of the two Z-scores.
STATISTICS = ("energy", "increment", "both")

#: Which steps feed the sliding window. ``"first_pass"``: only on-policy steps (reuse index 1) — the window is a
#: fixed reference distribution that reuse passes cannot drag down. ``"accepted"``: every step the optimizer
#: applied (not gated). ``"all"``: every observed step, gated ones included.
REFERENCES = ("first_pass", "accepted", "all")


@dataclass(frozen=True)
class GateConfig:
    """Configuration of the DGG gate (frozen, validated).

    Args:
        window: number of reference observations the sliding window holds; the gate is inactive until it is
            full. Range: 2 <= window <= 65536.
        tau: Z-score threshold; a step on a reuse pass (k > 1) whose Z-score exceeds ``tau`` is gated and ends
            reuse of the batch. The paper recommends 0.1-0.5. Range: finite, > 0.
        max_reuse: K, the maximum number of passes over one rollout batch (used by :meth:`GatedOptimizer.passes`
            and to validate :meth:`GatedOptimizer.set_reuse_index`). Range: 1 <= max_reuse <= 1024.
        statistic: what the Z-score is taken of, one of ``STATISTICS``.
        reference: which steps enter the window, one of ``REFERENCES``.
        std_floor: relative floor on the window's standard deviation, as a fraction of the mean absolute
            window value, so that a (near-)constant window does not turn float noise into huge Z-scores.
            Range: 0 <= std_floor < 1.
    """

    window: int = 8
    tau: float = 0.3
    max_reuse: int = 4
    statistic: str = "energy"
    reference: str = "first_pass"
    std_floor: float = 1e-3

    def __post_init__(self) -> None:
        _check_int("window", self.window, 2, 65536)
        _check_int("max_reuse", self.max_reuse, 1, 1024)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)):
            raise ValueError(f"GateConfig.tau must be a real number > 0, got {self.tau!r}")
        if not math.isfinite(self.tau) or self.tau <= 0:
            raise ValueError(f"GateConfig.tau must be finite and > 0, got {self.tau!r}")
        if isinstance(self.std_floor, bool) or not isinstance(self.std_floor, (int, float)):
            raise ValueError(f"GateConfig.std_floor must be a real number in [0, 1), got {self.std_floor!r}")
        if not (0.0 <= self.std_floor < 1.0):
            raise ValueError(f"GateConfig.std_floor must be in [0, 1), got {self.std_floor!r}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"GateConfig.statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"GateConfig.reference must be one of {REFERENCES}, got {self.reference!r}")
        # Normalise numeric types so that asdict()/from_dict() round-trips exactly.
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "std_floor", float(self.std_floor))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-serialisable), the form stored in checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GateConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"GateConfig.from_dict: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(d))


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"GateConfig.{name} must be an int in [{lo}, {hi}], got {value!r}")
    if not (lo <= value <= hi):
        raise ValueError(f"GateConfig.{name} must be in [{lo}, {hi}], got {value}")
