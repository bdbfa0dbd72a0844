"""The DGG rule as pure tensor arithmetic over a :class:`GateState`: the reference implementation.

Nothing here reads a device value on the host: every decision is a ``torch.where`` / comparison producing a
tensor, so one gate step is a fixed sequence of small kernels (CUDA-graph capturable, ``torch.compile`` friendly)
and never stalls the pipeline. The exact rule, with its reasoning, is in ``docs/rule.md``; every fused twin
(``_triton.py``, ``csrc/gate_epilogue.h``) is tested against this module (tests/test_gate.py).
"""

from __future__ import annotations

import torch

from ..config import GateConfig, Reference, Statistic
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
    be None only without the energy rule (``config.energy=False``); ``drift`` is needed when ``config.uses_drift``.
    With ``config.action="watch"`` a trip is recorded (``last``'s gated flag, the trips counter) but the step is not
    skipped and the batch does not stop."""
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
        d = drift.detach().reshape(())
        d = (d if d.device == dev else d.to(dev)).to(torch.float32)
        d_finite = torch.isfinite(d)
        if config.drift_rule == "threshold":
            d_stat = d
            d_cond = ~d_finite | (d > config.drift_threshold)
        else:
            d_stat = torch.where(d_finite, zscore(state.drift_window, state.drift_filled, d, config.std_floor), inf)
            d_cond = (state.drift_filled >= w) & (d_stat > config.tau)
        if not config.energy:
            cond = d_cond
        elif config.combine == "any":
            cond = cond | d_cond
        else:
            cond = cond & d_cond

    active = (k > 1) & observed
    trip = active & cond
    if config.action == "skip":
        skipped = stopped_before | trip
    else:  # watch: the trip is recorded, nothing is dropped and no batch stops
        skipped = torch.zeros_like(trip)

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
    state.stopped.copy_(skipped)
    state.counters.add_(torch.stack([torch.ones_like(trip), skipped, trip]).to(torch.int64))
    skip = skipped.to(torch.float32)
    state.last.copy_(torch.stack([e, z, trip.to(torch.float32), skip]))
    state.skip.copy_(skip)
