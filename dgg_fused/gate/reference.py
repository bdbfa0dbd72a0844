"""The DGG rule as pure tensor arithmetic over a :class:`GateState`: the reference implementation.

Nothing here reads a device value on the host: every decision is a ``torch.where`` / comparison producing a
tensor, so one gate step is a fixed sequence of small kernels (CUDA-graph capturable, ``torch.compile`` friendly)
and never stalls the pipeline. The exact rule, with its reasoning, is in ``docs/rule.md``; every fused twin
(``_triton.py``, ``csrc/gate_epilogue.h``) is tested against this module (tests/test_gate.py).
"""

from __future__ import annotations

import torch

from ..config import Action, GateConfig, Reference, Statistic
from .state import GateState

__all__ = ["zscore", "energy_from", "update_reference_"]

_TINY = torch.finfo(torch.float32).tiny


def zscore(row: torch.Tensor, filled: torch.Tensor, x: torch.Tensor, std_floor: float) -> torch.Tensor:
    """Z-score of ``x`` against the valid (last ``filled``) entries of the shift buffer ``row``.

    Statistics are computed in float32 on values normalised by the window's mean absolute value (taken in float64,
    so that neither it nor the squares can overflow for any finite float32 window). The standard deviation is the
    population one, floored at ``std_floor * mean(|w|)``. Returns 0 while fewer than two entries are valid.
    """
    w = row.shape[0]
    valid = torch.arange(w, device=row.device) >= (w - filled)
    n = filled.clamp(min=1).to(torch.float32)
    vals = torch.where(valid, row, torch.zeros((), dtype=row.dtype, device=row.device))
    scale = (vals.abs().sum(dtype=torch.float64) / n.to(torch.float64)).to(torch.float32).clamp(min=_TINY)
    v = vals / scale
    mean = v.sum() / n
    dev = torch.where(valid, v - mean, torch.zeros((), dtype=row.dtype, device=row.device))
    std = (dev.square().sum() / n).sqrt()
    denom = std.clamp(min=max(std_floor, 0.0)).clamp(min=_TINY)  # abs-mean of v is 1: floor is std_floor
    z = (x.to(torch.float32) / scale - mean) / denom
    return torch.where(filled >= 2, z, torch.zeros_like(z))


def energy_from(energy: torch.Tensor, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The 0-d float32 energy a gate step sees: ``energy`` (0-d, or 1-D partial sums added in float64 and rounded
    once, as the fused twins do), divided by ``grad_scale**2`` in float32 when given (a GradScaler's scale)."""
    e = energy.detach()
    e = e.sum(dtype=torch.float64) if e.dim() > 0 else e
    e = e.to(torch.float32)
    if grad_scale is not None:
        s = grad_scale.detach().reshape(())
        s = (s if s.device == e.device else s.to(e.device)).to(torch.float32)
        e = e / (s * s)
    return e


def _push_(row: torch.Tensor, x: torch.Tensor, enter: torch.Tensor) -> None:
    """Append ``x`` to the shift buffer ``row`` where ``enter`` (a 0-d bool tensor) is true."""
    shifted = torch.cat([row[1:], x.reshape(1).to(row.dtype)])
    row.copy_(torch.where(enter, shifted, row))


def update_reference_(
    state: GateState,
    energy: torch.Tensor | None,
    config: GateConfig,
    *,
    grad_scale: torch.Tensor | None = None,
    external_skip: torch.Tensor | None = None,
    drift: torch.Tensor | None = None,
) -> None:
    """The rule of ``docs/rule.md`` on ``state`` (in place); see :func:`dgg_fused.gate.gate_step_`. ``energy`` may
    be None only when the gate reads none (``config.reads_energy`` false); ``drift`` is needed when
    ``config.takes_drift`` (``"energy_decay"`` is computed here from ``energy``). With ``config.action="watch"`` a
    trip is recorded (``last``'s gated flag, the trips counter) but the step is not skipped and the batch does not
    stop; with ``"scale"`` the learning-rate factor goes to ``state.scale`` and only a non-finite statistic drops
    the step (no batch stops)."""
    dev = state.device
    if energy is None:
        e = torch.full((), float("nan"), dtype=torch.float32, device=dev)
    else:
        e = energy_from(energy, grad_scale)
        if e.device != dev:
            e = e.to(dev)
    stopped_before = state.stopped.clone()
    observed = ~stopped_before
    if external_skip is not None:
        observed = observed & ~(external_skip.reshape(()) > 0)
    k = state.reuse_index
    w = state.window.shape[1]
    inf = torch.full((), float("inf"), dtype=torch.float32, device=e.device)

    if config.energy:  # the energy rule (without it: no energy statistic, its window and prev_energy untouched)
        finite = torch.isfinite(e)
        inc = e - state.prev_energy
        inc_ok = torch.isfinite(inc)
        z_e = zscore(state.window[0], state.filled[0], e, config.std_floor)
        z_i = zscore(state.window[1], state.filled[1], inc, config.std_floor)
        full_e = state.filled[0] >= w
        full_i = state.filled[1] >= w
        stat = config.statistic_code
        if stat == Statistic.ENERGY:
            z, full = z_e, full_e
        elif stat == Statistic.INCREMENT:
            z, full = torch.where(inc_ok, z_i, torch.zeros_like(z_i)), full_i
        else:  # BOTH: fmax ignores the NaN of an undefined increment
            z, full = torch.fmax(z_e, z_i), full_e & full_i
        z = torch.where(finite, z, inf)
        cond = full & (z > config.tau)
    else:
        z = torch.full((), float("nan"), dtype=torch.float32, device=e.device)
    if config.uses_drift:
        if config.takes_drift:
            d = drift.detach().reshape(())
            d = (d if d.device == dev else d.to(dev)).to(torch.float32)
        else:  # energy_decay: this step's energy over the mean of the batch's first-pass energies (this one included)
            d = _energy_decay_(state, e, observed & (k == 1))
        d_finite = torch.isfinite(d)
        below = config.trip_direction == "below"
        if config.drift_rule == "threshold":
            d_stat = d
            beyond = (d < config.drift_threshold) if below else (d > config.drift_threshold)
            d_cond = ~d_finite | beyond
        else:
            z_d = zscore(state.drift_window, state.drift_filled, d, config.std_floor)
            d_stat = torch.where(d_finite, z_d, -inf if below else inf)
            d_cond = (state.drift_filled >= w) & ((d_stat < -config.tau) if below else (d_stat > config.tau))
        if not config.energy:
            cond = d_cond
        else:
            e_cond = cond
            cond = cond | d_cond if config.combine == "any" else cond & d_cond

    active = (k > 1) & observed
    trip = active & cond
    action = config.action_code
    if action == Action.SKIP:
        skipped = stopped_before | trip
    elif action == Action.WATCH:  # the trip is recorded, nothing is dropped and no batch stops
        skipped = torch.zeros_like(trip)
    else:  # SCALE: the trip scales the step's learning rate; only a non-finite statistic drops it; no batch stops
        skipped = active & ~d_finite
        state.scale.copy_(_lr_factor(d, config, trip, skipped))

    ref = config.reference_code
    if ref == Reference.FIRST_PASS:
        enter = observed & (k == 1)
    elif ref == Reference.ACCEPTED:
        enter = ~skipped
    else:  # ALL
        enter = observed
    if config.energy:
        enter_e = enter & finite
        enter_i = enter & finite & inc_ok
        _push_(state.window[0], e, enter_e)
        _push_(state.window[1], inc, enter_i)
        state.filled.add_(torch.stack([enter_e, enter_i]).to(torch.int64)).clamp_(max=w)
        state.prev_energy.copy_(torch.where(observed & finite, e, state.prev_energy))
    if config.uses_drift:
        enter_d = enter & d_finite
        if config.drift_rule == "zscore":
            _push_(state.drift_window, d, enter_d)
            state.drift_filled.add_(enter_d.to(torch.int64)).clamp_(max=w)
        state.drift_last.copy_(torch.stack([d, d_stat]))
        if config.energy:  # which rule fired on a trip (metrics: energy_trips, drift_trips)
            state.rule_trips.add_(torch.stack([trip & e_cond, trip & d_cond]).to(torch.int64))
    state.stopped.copy_(skipped if action == Action.SKIP else torch.zeros_like(skipped))
    state.counters.add_(torch.stack([torch.ones_like(trip), skipped, trip]).to(torch.int64))
    skip = skipped.to(torch.float32)
    state.last.copy_(torch.stack([e, z, trip.to(torch.float32), skip]))
    state.skip.copy_(skip)


def _energy_decay_(state: GateState, e: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Add a finite first-pass energy ``e`` (where ``first``) to the batch's first-pass sum, then return
    ``e / (sum / count)`` as float32 (sum, mean and ratio in float64, rounded once). NaN while the batch has no
    first-pass energy (count 0) or for a non-finite ``e``, inf for ``e > 0`` over a zero mean (all three trip, as
    any non-finite statistic does), and exactly 1 for a zero energy over a zero mean: a batch whose gradients are all zero (every group's rewards equal,
    so every advantage is 0) has nothing to decay, and its steps are no evidence of harm (docs/signals.md)."""
    enter = first & torch.isfinite(e)
    state.first_pass_energy.add_(torch.where(enter, e.to(torch.float64), torch.zeros_like(state.first_pass_energy)))
    state.first_pass_count.add_(enter.to(torch.int64))
    mean = state.first_pass_energy / state.first_pass_count.to(torch.float64)
    e64 = e.to(torch.float64)
    ratio = torch.where((e64 == 0) & (mean == 0), torch.ones_like(e64), e64 / mean)
    return ratio.to(torch.float32)


def _lr_factor(d: torch.Tensor, config: GateConfig, trip: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """``action="scale"``'s learning-rate factor (float32): where the rule tripped, ``d / t`` clamped to [0, 1] for a
    "below" statistic, ``t / d`` (< 1, as d > t) for an "above" one, t = ``drift_threshold``; 1 where it did not
    trip (first passes included); 0 where the step is dropped (a non-finite d)."""
    t = config.drift_threshold
    f = (d / t).clamp(0.0, 1.0) if config.trip_direction == "below" else (t / d).clamp(0.0, 1.0)
    f = torch.where(trip, f, torch.ones_like(f))
    return torch.where(dropped, torch.zeros_like(f), f)
