"""The DGG rule as pure tensor arithmetic over a small device-resident state.

Nothing here reads a device value on the host: every decision is a ``torch.where`` / comparison producing a
tensor, so one gate step is a fixed sequence of small kernels (CUDA-graph capturable, ``torch.compile``
friendly) and never stalls the pipeline. The exact rule, with its reasoning, is in ``docs/rule.md``; this module
is its reference implementation, which every fused implementation of the epilogue is tested against.

The gate does not know how the energy was computed (``dgg_fused.ops``) nor what an optimizer is
(``dgg_fused.optimizer``): data flows optimizer -> gate -> ops.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .config import REFERENCES, STATISTICS, GateConfig
from .ops import gate_epilogue_, resolve_epilogue

__all__ = ["GateState", "gate_step_", "zscore"]

# Index of each scalar in ``GateState.last`` (the metrics of the most recent step).
LAST_ENERGY, LAST_STATISTIC, LAST_GATED, LAST_SKIPPED = range(4)
# Index of each counter in ``GateState.counters``.
CNT_STEPS, CNT_GATED_STEPS, CNT_STOPPED_BATCHES = range(3)

_TINY = torch.finfo(torch.float32).tiny


@dataclass
class GateState:
    """Device-resident state of one gate. All tensors live on the lm_head gradient's device.

    Attributes:
        window: ``(2, W)`` float32 shift buffer; row 0 holds reference energies, row 1 reference increments.
            The newest entry is at the end; the valid entries of a row are its last ``filled[row]`` ones.
        filled: ``(2,)`` int64, number of valid entries per row (at most W).
        prev_energy: ``()`` float32, the last finite energy observed (NaN before the first one).
        reuse_index: ``()`` int64, the current reuse pass k (1 = on-policy), written by ``set_reuse_index``.
        stopped: ``()`` bool, the current batch has tripped the gate.
        counters: ``(3,)`` int64: steps, gated (skipped) steps, stopped batches.
        last: ``(4,)`` float32 metrics of the last step: energy, statistic (Z-score), gated (0/1), skipped (0/1).
        skip: ``()`` float32, 1.0 when the last step must not be applied, else 0.0 (the ``found_inf`` protocol).
        drift_window: ``(W,)`` float32 shift buffer of reference drift values (``drift_rule="zscore"`` only).
        drift_filled: ``()`` int64, number of valid entries of ``drift_window``.
        drift_last: ``(2,)`` float32 metrics of the last step's drift rule: value, statistic (the value itself
            for ``"threshold"``, its Z-score for ``"zscore"``); 0 until a drift statistic is observed.
    """

    window: torch.Tensor
    filled: torch.Tensor
    prev_energy: torch.Tensor
    reuse_index: torch.Tensor
    stopped: torch.Tensor
    counters: torch.Tensor
    last: torch.Tensor
    skip: torch.Tensor
    drift_window: torch.Tensor
    drift_filled: torch.Tensor
    drift_last: torch.Tensor

    @classmethod
    def create(cls, window: int, device: torch.device | str) -> "GateState":
        dev = torch.device(device)
        return cls(
            window=torch.zeros(2, window, dtype=torch.float32, device=dev),
            filled=torch.zeros(2, dtype=torch.int64, device=dev),
            prev_energy=torch.full((), float("nan"), dtype=torch.float32, device=dev),
            reuse_index=torch.ones((), dtype=torch.int64, device=dev),
            stopped=torch.zeros((), dtype=torch.bool, device=dev),
            counters=torch.zeros(3, dtype=torch.int64, device=dev),
            last=torch.zeros(4, dtype=torch.float32, device=dev),
            skip=torch.zeros((), dtype=torch.float32, device=dev),
            drift_window=torch.zeros(window, dtype=torch.float32, device=dev),
            drift_filled=torch.zeros((), dtype=torch.int64, device=dev),
            drift_last=torch.zeros(2, dtype=torch.float32, device=dev),
        )

    #: Tensors added after the first checkpoint format; a checkpoint without them loads with fresh values.
    OPTIONAL = ("drift_window", "drift_filled", "drift_last")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of every tensor (a checkpoint must not alias live state)."""
        return {k: v.detach().clone() for k, v in self.tensors().items()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Copy a :meth:`state_dict` into this state in place (addresses stay stable for CUDA graphs).

        Validates every key, shape and dtype before writing anything, so a bad checkpoint changes nothing.
        """
        mine = self.tensors()
        if any(k not in sd for k in self.OPTIONAL):  # an older checkpoint: fresh drift state
            fresh = GateState.create(self.window.shape[1], self.skip.device).tensors()
            sd = {**{k: fresh[k] for k in self.OPTIONAL}, **sd}
        missing, unknown = set(mine) - set(sd), set(sd) - set(mine)
        if missing or unknown:
            raise ValueError(f"gate state: missing keys {sorted(missing)}, unexpected keys {sorted(unknown)}")
        for k, dst in mine.items():
            src = sd[k]
            if not isinstance(src, torch.Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
                got = (tuple(src.shape), src.dtype) if isinstance(src, torch.Tensor) else type(src).__name__
                raise ValueError(
                    f"gate state '{k}': expected shape {tuple(dst.shape)} dtype {dst.dtype}, got {got}"
                    " (was the checkpoint written with another GateConfig.window?)"
                )
        for k, dst in mine.items():
            dst.copy_(sd[k])

    def to(self, device: torch.device | str) -> None:
        """Move every tensor to ``device`` (in place on this object)."""
        for k, v in self.tensors().items():
            setattr(self, k, v.to(device))


def zscore(row: torch.Tensor, filled: torch.Tensor, x: torch.Tensor, std_floor: float) -> torch.Tensor:
    """Z-score of ``x`` against the valid (last ``filled``) entries of the shift buffer ``row``.

    Statistics are computed in float32 on values normalised by the window's mean absolute value (so that
    squaring cannot overflow for any finite energy). The standard deviation is the population one, floored at
    ``std_floor * mean(|w|)``. Returns 0 while fewer than two entries are valid.
    """
    w = row.shape[0]
    valid = torch.arange(w, device=row.device) >= (w - filled)
    n = filled.clamp(min=1).to(torch.float32)
    vals = torch.where(valid, row, torch.zeros((), dtype=row.dtype, device=row.device))
    scale = (vals.abs().sum() / n).clamp(min=_TINY)
    v = vals / scale
    mean = v.sum() / n
    dev = torch.where(valid, v - mean, torch.zeros((), dtype=row.dtype, device=row.device))
    std = (dev.square().sum() / n).sqrt()
    denom = std.clamp(min=max(std_floor, 0.0)).clamp(min=_TINY)  # abs-mean of v is 1: floor is std_floor
    z = (x.to(torch.float32) / scale - mean) / denom
    return torch.where(filled >= 2, z, torch.zeros_like(z))


def _push_(row: torch.Tensor, x: torch.Tensor, enter: torch.Tensor) -> None:
    """Append ``x`` to the shift buffer ``row`` where ``enter`` (a 0-d bool tensor) is true."""
    shifted = torch.cat([row[1:], x.reshape(1).to(row.dtype)])
    row.copy_(torch.where(enter, shifted, row))


def gate_step_(
    state: GateState,
    energy: torch.Tensor | None,
    config: GateConfig,
    external_skip: torch.Tensor | None = None,
    *,
    drift: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """One DGG decision: update ``state`` in place and return the 0-d float32 skip flag (1.0 = drop the step).

    ``energy`` is the lm_head gradient energy of this step (0-d, any float dtype; promoted to float32). The
    rule (docs/rule.md):

    * ``x_E = E_t`` and ``x_I = E_t - E_prev``; ``z = Z(x)`` against the window row(s) chosen by
      ``config.statistic`` (``"both"``: the larger Z, ignoring an undefined one); a non-finite energy has z = +inf.
    * The gate is *active* when k > 1, the window row(s) in use are full, and the batch has not tripped yet.
    * ``trip = active and z > tau``; a trip stops the batch: this and every later step until
      ``set_reuse_index(1)`` is skipped. Steps on a stopped batch change nothing but the counters.
    * Finite observations enter the window as ``config.reference`` says.
    * ``external_skip`` (0-d, > 0 means set): a step the caller drops anyway (a GradScaler overflow). The gate
      ignores it like a step on a stopped batch: no trip, no window update, only ``steps`` is counted.

    * Drift (``config.drift`` set): ``drift`` (0-d) is the watched policy-drift statistic of this step. Its rule
      (``config.drift_rule``) is ``drift > drift_threshold`` or ``Z(drift) > tau`` against its own window (full),
      a non-finite value counting as exceeded; it combines with the energy rule by ``config.combine`` (``"any"``:
      either trips; ``"all"``: both must). Trips, stops and windows then follow the same rules as above.
      ``config.energy=False``: only the drift rule; ``energy`` may be None.

    ``impl`` picks the implementation (``dgg_fused.ops.resolve_epilogue``): ``"reference"`` is the torch code
    below; ``"triton"``/``"cuda"``/``"cpp"`` run the same rule fused in one launch / one call (``energy`` may then
    also be a 1-D tensor of partial sums, added in order); ``"auto"`` takes a fused one on CUDA, else the reference
    (also under ``torch.compile``, where Inductor fuses the reference's ops). The fused implementations cover the
    energy-only rule; with a drift statistic configured ``"auto"`` takes the reference (still on the device, no
    sync) and an explicit fused ``impl`` raises ``ValueError``.
    """
    uses_drift = config.drift is not None or not config.energy
    if uses_drift:
        if drift is None:
            raise ValueError(f"gate_step_: GateConfig.drift={config.drift!r} needs this step's drift value (drift=...)")
        if impl not in ("auto", "reference"):
            raise ValueError(f"gate_step_: impl={impl!r} implements the energy-only rule; a drift gate runs 'reference'")
        impl = "reference"
    if config.energy and energy is None:
        raise ValueError("gate_step_: the energy rule needs this step's lm_head energy")
    if impl == "auto" and torch.compiler.is_compiling():
        impl = "reference"  # under torch.compile, Inductor fuses the reference's ops itself (no graph break)
    impl = resolve_epilogue(impl, state.skip.device)
    if impl != "reference":
        gate_epilogue_(
            impl,
            energy,
            state.tensors(),
            tau=config.tau,
            std_floor=config.std_floor,
            statistic=STATISTICS.index(config.statistic),
            reference=REFERENCES.index(config.reference),
            external_skip=external_skip,
        )
        return state.skip
    dev = state.skip.device
    if energy is None:
        e = torch.full((), float("nan"), dtype=torch.float32, device=dev)
    else:
        e = energy.detach().reshape(()).to(device=dev, dtype=torch.float32)
    finite = torch.isfinite(e)
    stopped_before = state.stopped.clone()
    observed = ~stopped_before
    if external_skip is not None:
        observed = observed & ~(external_skip.reshape(()) > 0)
    k = state.reuse_index
    w = state.window.shape[1]

    inc = e - state.prev_energy
    inc_ok = torch.isfinite(inc)

    z_e = zscore(state.window[0], state.filled[0], e, config.std_floor)
    z_i = zscore(state.window[1], state.filled[1], inc, config.std_floor)
    full_e = state.filled[0] >= w
    full_i = state.filled[1] >= w
    if config.statistic == "energy":
        z, full = z_e, full_e
    elif config.statistic == "increment":
        z, full = torch.where(inc_ok, z_i, torch.zeros_like(z_i)), full_i
    else:  # "both": fmax ignores the NaN of an undefined increment
        z, full = torch.fmax(z_e, z_i), full_e & full_i
    inf = torch.full((), float("inf"), dtype=torch.float32, device=e.device)
    z = torch.where(finite, z, inf)

    cond = full & (z > config.tau)  # the energy rule
    if uses_drift:
        d = drift.detach().reshape(()).to(device=dev, dtype=torch.float32)
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
    skipped = stopped_before | trip

    if config.reference == "first_pass":
        enter = observed & (k == 1)
    elif config.reference == "accepted":
        enter = ~skipped
    else:  # "all"
        enter = observed
    enter_e = enter & finite
    enter_i = enter & finite & inc_ok
    _push_(state.window[0], e, enter_e)
    _push_(state.window[1], inc, enter_i)
    if uses_drift:
        enter_d = enter & d_finite
        if config.drift_rule == "zscore":
            _push_(state.drift_window, d, enter_d)
            state.drift_filled.add_(enter_d.to(torch.int64)).clamp_(max=w)
        state.drift_last.copy_(torch.stack([d, d_stat]))
    state.filled.add_(torch.stack([enter_e, enter_i]).to(torch.int64)).clamp_(max=w)
    state.prev_energy.copy_(torch.where(observed & finite, e, state.prev_energy))
    state.stopped.copy_(skipped)
    state.counters.add_(torch.stack([torch.ones_like(trip), skipped, trip]).to(torch.int64))
    skip = skipped.to(torch.float32)
    z_out = z if config.energy else torch.full_like(z, float("nan"))  # no energy statistic without the energy rule
    state.last.copy_(torch.stack([e, z_out, trip.to(torch.float32), skip]))
    state.skip.copy_(skip)
    return state.skip
