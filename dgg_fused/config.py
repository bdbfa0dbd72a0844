"""GateConfig: the knobs of the Dynamic Gradient Gating rule.

Every field is validated in ``__post_init__``; a bad value raises ``ValueError`` naming the field and the
allowed range, so a typo in a launch script fails at construction time instead of silently training ungated.
The exact rule these fields parameterise is written down in ``docs/rule.md``.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields
from enum import IntEnum
from typing import Any, Mapping

__all__ = ["GateConfig", "STATISTICS", "REFERENCES", "ACTIONS", "DRIFT_STATS", "DRIFT_RULES", "COMBINES",
           "Statistic", "Reference", "Action"]  # fmt: skip


class Statistic(IntEnum):
    """What the Z-score is taken of, with the integer code every encoding of the rule shares (the C++
    ``dgg::Statistic`` enum in csrc/gate_epilogue.h and the Triton epilogue's constexprs are checked against it by
    tests/test_gate.py). ``ENERGY``: the lm_head gradient energy E_t = ||g_t||^2. ``INCREMENT``: its step-wise
    increment E_t - E_{t-1}. ``BOTH``: the larger of the two Z-scores."""

    ENERGY = 0
    INCREMENT = 1
    BOTH = 2


class Reference(IntEnum):
    """Which steps feed the sliding window (codes shared like :class:`Statistic`). ``FIRST_PASS``: only on-policy
    steps (reuse index 1) -- a fixed reference distribution that reuse passes cannot drag down. ``ACCEPTED``: every
    step the optimizer applied (not gated). ``ALL``: every observed step, gated ones included."""

    FIRST_PASS = 0
    ACCEPTED = 1
    ALL = 2


class Action(IntEnum):
    """What a trip does. ``SKIP`` (the default, the paper's rule): the step is dropped exactly and reuse of the
    batch stops. ``WATCH``: the rule is evaluated and recorded in the metrics (``statistic``, and ``gated`` = the
    rule fired on this step), but no step is ever dropped and reuse is never stopped: the inner optimizer's
    results are bit-identical to running it unwrapped."""

    SKIP = 0
    WATCH = 1


#: The names of :class:`Statistic`, :class:`Reference` and :class:`Action` (what :class:`GateConfig` takes).
STATISTICS = tuple(s.name.lower() for s in Statistic)
REFERENCES = tuple(r.name.lower() for r in Reference)
ACTIONS = tuple(a.name.lower() for a in Action)

#: Policy-drift statistics a caller can hand to the gate (:meth:`GatedOptimizer.record_drift`, computed by
#: :func:`dgg_fused.drift_stats` from the loss's log-probabilities). ``"approx_kl"``: the k3 estimator
#: ``E[(r - 1) - log r]`` of KL(rollout policy || current policy), r the importance ratio; ``"clip_frac"``: the
#: fraction of tokens whose ratio is outside ``[1 - eps, 1 + eps]``; ``"ratio_max"``: ``max |log r|``.
DRIFT_STATS = ("approx_kl", "clip_frac", "ratio_max")

#: How a drift statistic trips: ``"threshold"``: its value exceeds ``drift_threshold`` (PPO's target-KL early
#: stop); ``"zscore"``: its Z-score against a window of reference values (``reference``) exceeds ``tau``.
DRIFT_RULES = ("threshold", "zscore")

#: How the energy rule and the drift rule combine when both are on: ``"any"`` trips when either trips;
#: ``"all"`` only when both do.
COMBINES = ("any", "all")

#: The largest finite float32: the gate compares in float32, so a threshold beyond it would be +inf there.
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class GateConfig:
    """Configuration of the DGG gate (frozen, validated). The exact rule is in docs/rule.md.

    Args:
        window: number of reference observations the sliding window holds; the gate is inactive until it is
            full. Range: 2 <= window <= 65536.
        tau: Z-score threshold; a step on a reuse pass (k > 1) whose Z-score exceeds ``tau`` trips the gate.
            The paper recommends 0.1-0.5. Range: > 0 and at most the largest float32 (the gate compares in float32).
        max_reuse: K, the maximum number of passes over one rollout batch (used by :meth:`GatedOptimizer.passes`
            and to validate :meth:`GatedOptimizer.set_reuse_index`). Range: 1 <= max_reuse <= 1024.
        statistic: what the Z-score is taken of, one of ``STATISTICS``.
        reference: which steps enter the window, one of ``REFERENCES``.
        std_floor: relative floor on the window's standard deviation, as a fraction of the mean absolute
            window value, so that a (near-)constant window does not turn float noise into huge Z-scores.
            Range: 0 <= std_floor < 1.
        energy: use the paper's rule on the lm_head gradient energy (``statistic``/``reference``/``tau``). With
            ``energy=False`` the lm_head is not read at all and ``drift`` must be set.
        drift: a policy-drift statistic to watch (one of ``DRIFT_STATS``), handed in per step with
            :meth:`GatedOptimizer.record_drift`; None (default) watches none.
        drift_rule: how ``drift`` trips, one of ``DRIFT_RULES``.
        drift_threshold: the threshold of ``drift_rule="threshold"`` (e.g. a target KL). Range as ``tau``.
        combine: how the energy and drift rules combine when both are on, one of ``COMBINES``.
        action: what a trip does, one of ``ACTIONS`` (:class:`Action`): ``"skip"`` (default) drops the step and
            stops reuse of the batch; ``"watch"`` only records it (the statistic and whether the rule fired), never
            dropping a step or stopping reuse.

    A field the configured rule never reads must keep its default (``ValueError`` otherwise): e.g. ``tau`` of a
    drift-only threshold gate, or ``drift_rule`` / ``drift_threshold`` / ``combine`` without ``drift``
    (``window`` is always allowed: it also sizes the gate state).
    """

    window: int = 8
    tau: float = 0.3
    max_reuse: int = 4
    statistic: str = "energy"
    reference: str = "first_pass"
    std_floor: float = 1e-3
    energy: bool = True
    drift: str | None = None
    drift_rule: str = "threshold"
    drift_threshold: float = 0.02
    combine: str = "any"
    action: str = "skip"

    def __post_init__(self) -> None:
        _check_int("window", self.window, 2, 65536)
        _check_int("max_reuse", self.max_reuse, 1, 1024)
        _check_threshold("tau", self.tau)
        if not is_real(self.std_floor):
            raise ValueError(f"GateConfig.std_floor must be a real number in [0, 1), got {self.std_floor!r}")
        if not (0.0 <= self.std_floor < 1.0):
            raise ValueError(f"GateConfig.std_floor must be in [0, 1), got {self.std_floor!r}")
        _check_name("statistic", self.statistic, STATISTICS)
        _check_name("reference", self.reference, REFERENCES)
        if not isinstance(self.energy, bool):
            raise ValueError(f"GateConfig.energy must be a bool, got {self.energy!r}")
        if self.drift is not None and self.drift not in DRIFT_STATS:
            raise ValueError(f"GateConfig.drift must be None or one of {DRIFT_STATS}, got {self.drift!r}")
        if not self.energy and self.drift is None:
            raise ValueError("GateConfig: energy=False needs a drift statistic (drift=...), else nothing is watched")
        _check_name("drift_rule", self.drift_rule, DRIFT_RULES)
        _check_threshold("drift_threshold", self.drift_threshold)
        _check_name("combine", self.combine, COMBINES)
        _check_name("action", self.action, ACTIONS)
        # Normalise numeric types (numpy scalars included) so that asdict()/from_dict() round-trips exactly.
        object.__setattr__(self, "window", int(self.window))
        object.__setattr__(self, "max_reuse", int(self.max_reuse))
        object.__setattr__(self, "drift_threshold", float(self.drift_threshold))
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "std_floor", float(self.std_floor))
        for f in fields(self):
            if f.name not in self._read_fields() and getattr(self, f.name) != f.default:
                raise ValueError(
                    f"GateConfig.{f.name}={getattr(self, f.name)!r} does nothing here: {self._rule_words()} never "
                    f"reads it; leave it at its default {f.default!r}"
                )

    def _read_fields(self) -> set[str]:
        """The fields the configured rule reads (``window`` always: it also sizes the gate state and checkpoints)."""
        read = {"window", "max_reuse", "energy", "drift", "action"}
        if self.energy:
            read |= {"tau", "statistic", "reference", "std_floor"}
        if self.drift is not None:
            read.add("drift_rule")
            read |= {"drift_threshold"} if self.drift_rule == "threshold" else {"tau", "reference", "std_floor"}
            if self.energy:
                read.add("combine")
        return read

    def _rule_words(self) -> str:
        if self.drift is None:
            return "the energy rule without a drift statistic (drift=None)"
        drift = f"a {self.drift_rule} rule on {self.drift!r}"
        return f"{drift} combined with the energy rule" if self.energy else f"a drift-only gate ({drift})"

    @property
    def uses_drift(self) -> bool:
        """The gate watches a drift statistic."""
        return self.drift is not None or not self.energy

    @property
    def reference_only(self) -> bool:
        """Only the reference implementation runs this rule: the fused twins (C++/CUDA/Triton) implement the
        energy rule with ``action="skip"``; a drift statistic or ``action="watch"`` runs the reference (still on
        the device, no host sync)."""
        return self.uses_drift or self.action != "skip"

    @property
    def statistic_code(self) -> Statistic:
        """:attr:`statistic` as its shared integer code."""
        return Statistic[self.statistic.upper()]

    @property
    def reference_code(self) -> Reference:
        """:attr:`reference` as its shared integer code."""
        return Reference[self.reference.upper()]

    @property
    def action_code(self) -> Action:
        """:attr:`action` as its :class:`Action` code."""
        return Action[self.action.upper()]

    @classmethod
    def paper(cls, **overrides: Any) -> "GateConfig":
        """The paper's rule (arXiv 2605.19425): the Z-score of the lm_head gradient energy against a window of
        first-pass energies, tau 0.3, K = 4; the same as ``GateConfig()``. How it fared in our testbed: the
        README's Results."""
        return cls(**overrides)

    @classmethod
    def recommended(cls, **overrides: Any) -> "GateConfig":
        """PPO's target-KL early stop as a drift gate: ``energy=False, drift="approx_kl", drift_threshold=0.02``,
        exact and sync-free; feed it ``opt.record_drift(**drift_stats(logp, old_logp, mask))`` each step. Why we
        recommend it, and what it does not achieve: the README's Results."""
        return cls(**{"energy": False, "drift": "approx_kl", "drift_threshold": 0.02, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-serialisable), the form stored in checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GateConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}  # fields added later take their defaults in older checkpoints
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"GateConfig.from_dict: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(d))


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool: what every integer argument of the library accepts."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_real(value: Any) -> bool:
    """A real number (Python or numpy int/float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not is_int(value):
        raise ValueError(f"GateConfig.{name} must be an int in [{lo}, {hi}], got {value!r}")
    if not (lo <= value <= hi):
        raise ValueError(f"GateConfig.{name} must be in [{lo}, {hi}], got {value}")


def _check_name(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"GateConfig.{name} must be one of {allowed}, got {value!r}")


def _check_threshold(name: str, value: Any) -> None:
    if not is_real(value):
        raise ValueError(f"GateConfig.{name} must be a real number > 0, got {value!r}")
    if not (0 < value <= FLOAT32_MAX):  # NaN fails too
        raise ValueError(
            f"GateConfig.{name} must be > 0 and at most the largest float32 ({FLOAT32_MAX:.7g}; the gate compares "
            f"in float32), got {value!r}"
        )
