"""Triton twin of the gate rule: one single-program launch per gated step (imported only when it runs).

It reduces the energy partials (the per-tile partial sums of squares the energy op writes, or a 1-element energy),
applies the rule of ``dgg_fused/gate/reference.py`` (``csrc/gate_epilogue.h`` is the same rule in C++) and updates
the device-resident gate state in place. IEEE division and square root (``div_rn``/``sqrt_rn``) keep it within
rounding of the torch reference; the window sums differ from torch's only in summation order. The statistic and
reference codes are those of :class:`dgg_fused.config.Statistic` / :class:`~dgg_fused.config.Reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import Reference, Statistic
from ..ops.triton_sumsq import partials_block, sum_partials

__all__ = ["gate_epilogue_"]

_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny
# The shared codes (dgg_fused.config), as compile-time constants of the kernel.
STAT_ENERGY = tl.constexpr(int(Statistic.ENERGY))
STAT_INCREMENT = tl.constexpr(int(Statistic.INCREMENT))
REF_FIRST_PASS = tl.constexpr(int(Reference.FIRST_PASS))
REF_ACCEPTED = tl.constexpr(int(Reference.ACCEPTED))


@triton.jit
def _clamp_min(x, lo):
    return tl.where(x < lo, lo, x)  # like torch.clamp: NaN stays NaN


@triton.jit
def _zscore(row_ptr, W, filled, x, std_floor, TINY: tl.constexpr, WP: tl.constexpr):
    j = tl.arange(0, WP)
    valid = (j < W) & (j >= W - filled)
    vals = tl.load(row_ptr + j, mask=valid, other=0.0)
    n = tl.maximum(filled, 1).to(tl.float32)
    abs_sum = tl.sum(tl.abs(vals).to(tl.float64), axis=0)  # float64: cannot overflow for finite float32 values
    scale = _clamp_min((abs_sum / n.to(tl.float64)).to(tl.float32), TINY)
    v = tl.div_rn(vals, scale)
    mean = tl.div_rn(tl.sum(tl.where(valid, v, 0.0), axis=0), n)
    dev = tl.where(valid, v - mean, 0.0)
    std = tl.sqrt_rn(tl.div_rn(tl.sum(dev * dev, axis=0), n))
    denom = _clamp_min(_clamp_min(std, std_floor), TINY)
    z = tl.div_rn(tl.div_rn(x, scale) - mean, denom)
    return tl.where(filled >= 2, z, 0.0)


@triton.jit
def _gate_epilogue_kernel(
    partials_ptr, n_partials, scale_ptr, ext_ptr,
    window_ptr, W, filled_ptr, prev_ptr, k_ptr, stopped_ptr, counters_ptr, last_ptr, skip_ptr,
    tau, std_floor,
    STAT: tl.constexpr, REF: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_EXT: tl.constexpr,
    PB: tl.constexpr, WP: tl.constexpr, TINY: tl.constexpr,
):  # fmt: skip
    e = sum_partials(partials_ptr, n_partials, PB).to(tl.float32)  # the finalize kernel's order: same bits
    if HAS_SCALE:
        s = tl.load(scale_ptr).to(tl.float32)
        e = tl.div_rn(e, s * s)
    finite = (e - e) == 0.0
    stopped_before = tl.load(stopped_ptr) != 0
    observed = stopped_before == 0
    if HAS_EXT:
        observed = observed & (tl.load(ext_ptr) <= 0.0)
    k = tl.load(k_ptr)
    filled_e = tl.load(filled_ptr)
    filled_i = tl.load(filled_ptr + 1)
    prev = tl.load(prev_ptr)
    inc = e - prev
    inc_ok = (inc - inc) == 0.0
    z_e = _zscore(window_ptr, W, filled_e, e, std_floor, TINY, WP)
    z_i = _zscore(window_ptr + W, W, filled_i, inc, std_floor, TINY, WP)
    full_e = filled_e >= W
    full_i = filled_i >= W
    if STAT == STAT_ENERGY:
        z = z_e
        full = full_e
    elif STAT == STAT_INCREMENT:
        z = tl.where(inc_ok, z_i, 0.0)
        full = full_i
    else:  # fmax: ignore a NaN operand
        z = tl.where(z_e != z_e, z_i, tl.where(z_i != z_i, z_e, tl.maximum(z_e, z_i)))
        full = full_e & full_i
    z = tl.where(finite, z, float("inf"))
    active = (k > 1) & full & observed
    trip = active & (z > tau)
    skipped = stopped_before | trip
    if REF == REF_FIRST_PASS:
        enter = observed & (k == 1)
    elif REF == REF_ACCEPTED:
        enter = skipped == 0
    else:
        enter = observed
    enter_e = enter & finite
    enter_i = enter & finite & inc_ok

    j = tl.arange(0, WP)
    in_row = j < W
    nxt = (j + 1) < W
    row_e = tl.load(window_ptr + j + 1, mask=nxt, other=0.0)
    row_i = tl.load(window_ptr + W + j + 1, mask=nxt, other=0.0)
    tl.debug_barrier()  # every read of the window (above and in _zscore) happens before any write
    tl.store(window_ptr + j, tl.where(nxt, row_e, e), mask=in_row & enter_e)
    tl.store(window_ptr + W + j, tl.where(nxt, row_i, inc), mask=in_row & enter_i)
    tl.store(filled_ptr, tl.minimum(filled_e + enter_e.to(tl.int64), W))
    tl.store(filled_ptr + 1, tl.minimum(filled_i + enter_i.to(tl.int64), W))
    tl.store(prev_ptr, tl.where(observed & finite, e, prev))
    tl.store(stopped_ptr, skipped.to(tl.int8))
    tl.store(counters_ptr, tl.load(counters_ptr) + 1)
    tl.store(counters_ptr + 1, tl.load(counters_ptr + 1) + skipped.to(tl.int64))
    tl.store(counters_ptr + 2, tl.load(counters_ptr + 2) + trip.to(tl.int64))
    skip = skipped.to(tl.float32)
    tl.store(last_ptr, e)
    tl.store(last_ptr + 1, z)
    tl.store(last_ptr + 2, trip.to(tl.float32))
    tl.store(last_ptr + 3, skip)
    tl.store(skip_ptr, skip)


def gate_epilogue_(
    partials: torch.Tensor,
    grad_scale: torch.Tensor | None,
    external_skip: torch.Tensor | None,
    window: torch.Tensor,
    filled: torch.Tensor,
    prev_energy: torch.Tensor,
    reuse_index: torch.Tensor,
    stopped: torch.Tensor,
    counters: torch.Tensor,
    last: torch.Tensor,
    skip: torch.Tensor,
    *,
    tau: float,
    std_floor: float,
    statistic: int,
    reference: int,
) -> None:
    """One launch: the gate update on the state tensors (the kernel of ``dgg_fused::gate_epilogue_triton``)."""
    w = window.shape[1]
    n = partials.numel()
    wp = max(16, triton.next_power_of_2(w))
    _gate_epilogue_kernel[(1,)](
        partials, n,
        grad_scale if grad_scale is not None else partials,
        external_skip if external_skip is not None else partials,
        window, w, filled, prev_energy, reuse_index, stopped.view(torch.int8), counters, last, skip,
        float(tau), float(std_floor),
        STAT=statistic, REF=reference, HAS_SCALE=grad_scale is not None, HAS_EXT=external_skip is not None,
        PB=partials_block(n), WP=wp, TINY=_TINY,
        num_warps=min(8, max(1, wp // 256)),  # one warp for the usual windows (<= 256), more for huge ones
    )  # fmt: skip
