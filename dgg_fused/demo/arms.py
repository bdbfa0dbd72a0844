"""The testbed's arms: how many passes each rollout batch gets, and who decides to stop reusing it.

An arm (:class:`Arm`, a frozen, picklable spec) *is* its strategy: :meth:`Arm.start` gives the per-run
:class:`Strategy` that the training loop (:func:`dgg_fused.demo.run.run_arm`, the same for every arm) asks
everything arm-specific — which optimizer to step, whether a pass may start, whether to take a step at all (the
host-side KL stop), what to hand the gate before ``step()``, whether reuse has stopped after it. The loop never
asks what kind of arm it runs. Arms built on the library are defined by a :class:`dgg_fused.GateConfig` alone.

* ``k1`` / ``k2`` / ``naive``: :class:`FixedReuse` with K = 1, 2, ``cfg.K`` passes.
* ``kl``: :class:`HostKLStop` — the demo's own peer of PPO's target-KL early stop, decided on the host: on a
  reuse pass (k > 1), as soon as a mini-batch's approximate KL to the rollout policy exceeds ``target_kl``, the
  step is not taken and reuse of the batch ends (Stable-Baselines3's rule, applied to reuse passes).
* ``dgg``: :class:`Gated` with the paper's rule, ``cfg.gate`` (lm_head energy Z-score, default
  :class:`~dgg_fused.GateConfig`).
* ``klgate``: :class:`Gated` with the library's drift gate, ``GateConfig(energy=False, drift="approx_kl",
  drift_threshold=target_kl)`` — the same rule as ``kl``, exact and sync-free on the device.
* ``dgg-or-kl``: :class:`Gated`, energy rule OR KL threshold (``combine="any"``).
* ``oracle``: :class:`OracleStop` — the greedy oracle, a **ceiling, not a method** (docs/signals.md): each reuse
  step is taken on a snapshot and undone exactly, with reuse stopped, when it lowers the exact J of a separate
  oracle prompt set.

Command line: ``--arm NAME[:key=value,...]``; ``gate:...`` builds any GateConfig, e.g.
``gate:energy=false,drift=clip_frac,drift_threshold=0.1``. Keys of :class:`~dgg_fused.GateConfig` (and ``K`` /
``target_kl``) override the defaults.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .. import GateConfig, GatedOptimizer

__all__ = ["Arm", "FixedReuse", "HostKLStop", "Gated", "OracleStop", "Strategy", "RunContext", "parse_arm",
           "BASE_ARMS", "GRID_ARMS"]

#: The arms of the default run, in display order.
BASE_ARMS = ("k1", "k2", "naive", "kl", "dgg", "klgate", "dgg-or-kl")
#: The arms of the grid in docs/ablation.md.
GRID_ARMS = BASE_ARMS


@dataclass
class RunContext:
    """What an arm's strategy may use in one run (built by :func:`dgg_fused.demo.run.run_arm`).

    ``watch``: the watch-only gate configuration of an observed run (None: not observed); the strategy's
    :attr:`Strategy.gate` then reports the lm_head energy and its Z-score as the gate computes them.
    ``judge``: the exact expected reward on the oracle prompt set (only the oracle arm calls it).
    """

    model: torch.nn.Module
    inner: torch.optim.Optimizer
    watch: GateConfig | None
    judge: Callable[[], float]

    def watch_gate(self) -> GatedOptimizer | None:
        """A watch-only :class:`GatedOptimizer` around the inner optimizer for an observed run, else None."""
        if self.watch is None:
            return None
        return GatedOptimizer(self.inner, lm_head=self.model.lm_head, config=self.watch)


class Strategy:
    """One arm's decisions in one run. The training loop (:func:`dgg_fused.demo.run.run_arm`) is the same for every
    arm and asks its strategy everything arm-specific:

    * :attr:`opt` — the optimizer the loop steps; :attr:`gate` — the :class:`GatedOptimizer` whose metrics the harm
      oracle reads (the arm's own gate, or a watch-only one in an observed run; None otherwise);
    * :meth:`begin_pass` — may pass k start? (False: reuse of the batch has stopped);
    * :meth:`allow` — a host-side check before ``backward()`` (False: drop the step, stop reuse);
    * :meth:`before_step` — hand the gate what it watches (after ``backward()``, before clipping and ``step()``);
    * :meth:`after_step` — has reuse of this batch stopped? (read after ``step()``);
    * :meth:`counts` — ``(steps dropped, batches whose reuse was stopped)`` at the end of the run.
    """

    def __init__(self, opt: torch.optim.Optimizer, gate: GatedOptimizer | None = None) -> None:
        self.opt = opt
        self.gate = gate

    def begin_pass(self, k: int) -> bool:
        if self.gate is None:
            return True
        self.gate.set_reuse_index(k)
        return not self.gate.reuse_stopped

    def allow(self, k: int, stats: Mapping[str, torch.Tensor]) -> bool:
        return True

    def before_step(self, k: int, logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float) -> None:
        if self.gate is not None:
            self.gate.record_energy()  # the watch gate reads the energy before clipping, like the paper's gate

    def after_step(self, k: int) -> bool:
        return False

    def counts(self) -> tuple[int, int]:
        return 0, 0


@dataclass(frozen=True)
class Arm:
    """An arm: its name (the command-line spec), K, and the strategy it runs (:meth:`start`)."""

    name: str
    max_reuse: int

    def describe(self) -> str:
        return f"fixed K={self.max_reuse}"

    def start(self, ctx: RunContext) -> Strategy:
        """This arm's strategy for one run."""
        gate = ctx.watch_gate()
        return Strategy(gate if gate is not None else ctx.inner, gate)


@dataclass(frozen=True)
class FixedReuse(Arm):
    """K passes over every batch, no stopping rule (``k1``, ``k2``, ``naive``)."""


class _HostKLStrategy(Strategy):
    def __init__(self, arm: "HostKLStop", ctx: RunContext) -> None:
        gate = ctx.watch_gate()
        super().__init__(gate if gate is not None else ctx.inner, gate)
        self.target_kl = arm.target_kl
        self.trips = 0

    def allow(self, k: int, stats: Mapping[str, torch.Tensor]) -> bool:
        ok = k == 1 or float(stats["approx_kl"]) <= self.target_kl
        self.trips += not ok
        return ok

    def counts(self) -> tuple[int, int]:
        return 0, self.trips  # the step is never taken: nothing is dropped after backward


@dataclass(frozen=True)
class HostKLStop(Arm):
    """The demo's host-side KL early stop (reads the KL to the host every reuse step)."""

    target_kl: float = 0.02

    def describe(self) -> str:
        return f"host-side KL early stop, K={self.max_reuse}, target_kl={self.target_kl}"

    def start(self, ctx: RunContext) -> Strategy:
        return _HostKLStrategy(self, ctx)


class _GatedStrategy(Strategy):
    def __init__(self, arm: "Gated", ctx: RunContext) -> None:
        lm_head = ctx.model.lm_head if arm.gate.energy else None
        gate = GatedOptimizer(ctx.inner, lm_head=lm_head, config=arm.gate)
        super().__init__(gate, gate)
        self.config = arm.gate

    def before_step(self, k: int, logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float) -> None:
        if self.config.energy:
            self.gate.record_energy()  # before clipping, like the paper
        if self.config.drift is not None:
            from .. import drift_stats

            self.gate.record_drift(**drift_stats(logp.detach(), old_logp, mask, clip_eps=clip_eps))

    def after_step(self, k: int) -> bool:
        return bool(self.gate.reuse_stopped)

    def counts(self) -> tuple[int, int]:
        m = self.gate.get_metrics()
        return int(m["gated_steps"]), int(m["stopped_batches"])


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

    def start(self, ctx: RunContext) -> Strategy:
        return _GatedStrategy(self, ctx)


class _OracleStrategy(Strategy):
    """Takes each reuse step on a snapshot and keeps it only if the oracle set's exact J did not fall."""

    def __init__(self, ctx: RunContext) -> None:
        gate = ctx.watch_gate()
        super().__init__(gate if gate is not None else ctx.inner, gate)
        self.ctx = ctx
        self.j_before: float | None = None  # the oracle J of the current weights (None: not known)
        self.snapshot: tuple[dict, dict] | None = None
        self.rolled_back = self.trips = 0

    def before_step(self, k: int, logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float) -> None:
        super().before_step(k, logp, old_logp, mask, clip_eps)
        if k > 1:
            if self.j_before is None:
                self.j_before = self.ctx.judge()
            self.snapshot = ({n: t.detach().clone() for n, t in self.ctx.model.state_dict().items()},
                             copy.deepcopy(self.ctx.inner.state_dict()))

    def after_step(self, k: int) -> bool:
        if k == 1:
            self.j_before = None  # the weights moved; first passes are never judged
            return False
        j_after = self.ctx.judge()
        if j_after < self.j_before:
            params, state = self.snapshot
            self.ctx.model.load_state_dict(params)  # copies into the same tensors: bit-exact
            self.ctx.inner.load_state_dict(state)
            self.snapshot = None
            self.rolled_back += 1
            self.trips += 1
            return True
        self.j_before, self.snapshot = j_after, None
        return False

    def counts(self) -> tuple[int, int]:
        return self.rolled_back, self.trips


@dataclass(frozen=True)
class OracleStop(Arm):
    """The greedy oracle — a **ceiling, not a method**: on each reuse step it takes the step on a snapshot, computes
    the exact expected reward on the oracle prompt set (disjoint from the held-out evaluation set), and if it fell,
    restores the snapshot exactly and stops reuse of the batch. It uses the future J, which no method has."""

    def describe(self) -> str:
        return f"greedy oracle (a ceiling, not a method), K={self.max_reuse}: reuse step undone and reuse stopped " \
               "when it lowers the exact J of the oracle prompt set"

    def start(self, ctx: RunContext) -> Strategy:
        return _OracleStrategy(ctx)


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

    ``k1 | k2 | naive | oracle | kl | dgg | klgate | dgg-or-kl | gate``, optionally followed by ``:key=value,...`` where a key
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
    if base in ("k1", "k2", "naive", "oracle"):
        if kw:
            raise ValueError(f"arm {spec!r}: a fixed-K arm takes only K=")
        return (OracleStop if base == "oracle" else FixedReuse)(spec, K)
    if base == "kl":
        if kw:
            raise ValueError(f"arm {spec!r}: the host KL arm takes only K= and target_kl=")
        return HostKLStop(spec, K, tkl)
    if base in ("dgg", "gate"):
        g = dataclasses.replace(gate, max_reuse=K, **kw)
    elif base == "klgate":
        g = GateConfig.recommended(**{"max_reuse": K, "drift_threshold": tkl, "window": gate.window, **kw})
    elif base == "dgg-or-kl":
        g = dataclasses.replace(gate, max_reuse=K, drift="approx_kl", drift_threshold=tkl, combine="any", **kw)
    else:
        raise ValueError(f"unknown arm {spec!r}: use k1, k2, naive, oracle, kl, dgg, klgate, dgg-or-kl or gate "
                         "(optionally with :key=value,...)")
    return Gated(spec, K, g)
