"""The testbed's arms: how many passes each rollout batch gets, and who decides to stop reusing it.

An arm is a small strategy object (:class:`Arm`); the training loop (:func:`dgg_fused.demo.run.run_arm`) is the
same for all of them and asks the arm three things: which optimizer to step (:meth:`Arm.wrap`), whether to take a
step at all (:meth:`Arm.allow`, the host-side KL early stop), and what to hand the gate before ``step()``
(:meth:`Arm.before_step`). Arms built on the library are defined by a :class:`dgg_fused.GateConfig` alone.

* ``k1`` / ``k2`` / ``naive``: :class:`FixedReuse` with K = 1, 2, ``cfg.K`` passes.
* ``kl``: :class:`HostKLStop` — the demo's own peer of PPO's target-KL early stop, decided on the host: on a
  reuse pass (k > 1), as soon as a mini-batch's approximate KL to the rollout policy exceeds ``target_kl``, the
  step is not taken and reuse of the batch ends (Stable-Baselines3's rule, applied to reuse passes).
* ``dgg``: :class:`Gated` with the paper's rule, ``cfg.gate`` (lm_head energy Z-score, default
  :class:`~dgg_fused.GateConfig`).
* ``klgate``: :class:`Gated` with the library's drift gate, ``GateConfig(energy=False, drift="approx_kl",
  drift_threshold=target_kl)`` — the same rule as ``kl``, exact and sync-free on the device.
* ``dgg-or-kl``: :class:`Gated`, energy rule OR KL threshold (``combine="any"``).

Command line: ``--arm NAME[:key=value,...]``; ``gate:...`` builds any GateConfig, e.g.
``gate:energy=false,drift=clip_frac,drift_threshold=0.1``. Keys of :class:`~dgg_fused.GateConfig` (and ``K`` /
``target_kl``) override the defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .. import GateConfig, GatedOptimizer

__all__ = ["Arm", "FixedReuse", "HostKLStop", "Gated", "parse_arm", "BASE_ARMS", "GRID_ARMS"]

#: The arms of the default run, in display order.
BASE_ARMS = ("k1", "k2", "naive", "kl", "dgg", "klgate", "dgg-or-kl")
#: The arms of the grid in docs/ablation.md.
GRID_ARMS = BASE_ARMS


@dataclass(frozen=True)
class Arm:
    """Base strategy: K passes, every step taken, plain inner optimizer."""

    name: str
    max_reuse: int

    def describe(self) -> str:
        return f"fixed K={self.max_reuse}"

    def wrap(self, inner: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The optimizer the loop steps (default: the inner one)."""
        return inner

    def allow(self, k: int, stats: Mapping[str, torch.Tensor]) -> bool:
        """Host-side check before ``backward()``; False drops the step and ends reuse of the batch."""
        return True

    def before_step(self, opt: torch.optim.Optimizer, logp: torch.Tensor, old_logp: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float) -> None:
        """Hand the gate what it watches (called after ``backward()``, before clipping and ``step()``)."""

    def stopped(self, opt: torch.optim.Optimizer) -> bool:
        """Has the optimizer ended reuse of this batch? (read after ``step()``)."""
        return False


@dataclass(frozen=True)
class FixedReuse(Arm):
    """K passes over every batch, no stopping rule (``k1``, ``k2``, ``naive``)."""


@dataclass(frozen=True)
class HostKLStop(Arm):
    """The demo's host-side KL early stop (reads the KL to the host every reuse step)."""

    target_kl: float = 0.02

    def describe(self) -> str:
        return f"host-side KL early stop, K={self.max_reuse}, target_kl={self.target_kl}"

    def allow(self, k: int, stats: Mapping[str, torch.Tensor]) -> bool:
        return k == 1 or float(stats["approx_kl"]) <= self.target_kl


@dataclass(frozen=True)
class Gated(Arm):
    """An arm run by :class:`dgg_fused.GatedOptimizer` with ``gate``; ``max_reuse`` is ``gate.max_reuse``."""

    gate: GateConfig = dataclasses.field(default_factory=GateConfig)

    def describe(self) -> str:
        g = self.gate
        parts = []
        if g.energy:
            parts.append(f"energy Z (window={g.window}, tau={g.tau}, statistic={g.statistic}, "
                         f"reference={g.reference})")
        if g.drift is not None:
            parts.append(f"{g.drift} > {g.drift_threshold}" if g.drift_rule == "threshold"
                         else f"{g.drift} Z > tau={g.tau}")
        comb = " OR " if g.combine == "any" else " AND "
        return f"GatedOptimizer K={g.max_reuse}: " + comb.join(parts)

    def wrap(self, inner: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
        lm_head = model.lm_head if self.gate.energy else None
        return GatedOptimizer(inner, lm_head=lm_head, config=self.gate)

    def before_step(self, opt: torch.optim.Optimizer, logp: torch.Tensor, old_logp: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float) -> None:
        assert isinstance(opt, GatedOptimizer)
        if self.gate.energy:
            opt.record_energy()  # before clipping, like the paper
        if self.gate.drift is not None:
            from .. import drift_stats

            opt.record_drift(**drift_stats(logp.detach(), old_logp, mask, clip_eps=clip_eps))

    def stopped(self, opt: torch.optim.Optimizer) -> bool:
        return bool(opt.reuse_stopped)


_GATE_FIELDS = {f.name: f.type for f in dataclasses.fields(GateConfig)}


def _coerce(key: str, value: str) -> Any:
    v = value.strip()
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v.lower() == "none":
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def parse_arm(spec: str, gate: GateConfig, target_kl: float) -> Arm:
    """An arm from its command-line spec (the arm's name is the spec string).

    ``k1 | k2 | naive | kl | dgg | klgate | dgg-or-kl | gate``, optionally followed by ``:key=value,...`` where a key
    is ``K``, ``target_kl`` or any :class:`~dgg_fused.GateConfig` field. ``gate`` and ``dgg`` start from
    ``gate`` (the run's configuration, the paper's rule by default); ``klgate`` from the KL threshold rule.
    """
    base, _, opts = spec.partition(":")
    kw: dict[str, Any] = {}
    if opts:
        for item in opts.split(","):
            k, eq, v = item.partition("=")
            if not eq:
                raise ValueError(f"arm {spec!r}: option {item!r} is not key=value")
            kw[k.strip()] = _coerce(k.strip(), v)
    unknown = set(kw) - set(_GATE_FIELDS) - {"K", "target_kl"}
    if unknown:
        raise ValueError(f"arm {spec!r}: unknown option(s) {sorted(unknown)}; known: K, target_kl and the "
                         f"GateConfig fields {sorted(_GATE_FIELDS)}")
    K = int(kw.pop("K", {"k1": 1, "k2": 2}.get(base, gate.max_reuse)))
    tkl = float(kw.pop("target_kl", target_kl))
    if base in ("k1", "k2", "naive"):
        if kw:
            raise ValueError(f"arm {spec!r}: a fixed-K arm takes only K=")
        return FixedReuse(spec, K)
    if base == "kl":
        if kw:
            raise ValueError(f"arm {spec!r}: the host KL arm takes only K= and target_kl=")
        return HostKLStop(spec, K, tkl)
    if base in ("dgg", "gate"):
        g = dataclasses.replace(gate, max_reuse=K, **kw)
    elif base == "klgate":
        g = dataclasses.replace(gate, max_reuse=K, energy=False, drift="approx_kl", drift_threshold=tkl, **kw)
    elif base == "dgg-or-kl":
        g = dataclasses.replace(gate, max_reuse=K, drift="approx_kl", drift_threshold=tkl, combine="any", **kw)
    else:
        raise ValueError(f"unknown arm {spec!r}: use k1, k2, naive, kl, dgg, klgate, dgg-or-kl or gate "
                         "(optionally with :key=value,...)")
    return Gated(spec, K, g)
