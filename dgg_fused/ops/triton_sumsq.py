"""Triton backend of :func:`dgg_fused.ops.grad_sumsq`: a multi-tensor, persistent-grid, two-stage reduction.

Stage 1 (``_sumsq_partials_kernel``): a fixed grid of ``P`` programs. The tensors are laid end to end in a padded
"global element space" (each tensor's start rounded up to a multiple of ``BLOCK``); program ``p`` sums the range
``[p * span, (p + 1) * span)`` of it, walking every tensor that overlaps its range, so each byte is read once and
one launch covers any number of tensors and all three dtypes (a per-tensor dtype code picks the load type). Values
are cast to float32 right after ``tl.load`` (the interpreter gets bf16 arithmetic wrong otherwise, and it is the
accumulation type anyway). Full blocks are loaded unmasked; when every base address is 16-byte aligned a
divisibility hint makes them 16-byte vector loads (``ld.global.v4``, checked by compiling for sm_90 on a CPU box). Offsets are int64 throughout (tensors of more than 2**31 elements).

Stage 2 (``_sumsq_finalize_kernel``): one program sums the ``P`` partials in float64 in a fixed order.

``P`` depends only on the element count, never on the device, so the same input gives the same bits on any GPU.
The tensor table (address, start, numel, dtype code) lives on the device; on CUDA it is built once per distinct
set of gradient buffers (cached by address, copied from pinned memory without a sync), so steady-state training
steps and CUDA-graph replays do no host-to-device traffic (tables used while a graph is captured are kept for
the life of the process; other ones are evicted least-recently-used).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["sumsq", "sumsq_partials", "plan"]

BLOCK = 2048  # elements per program iteration (and the padding of tensor starts)
ELEMS_PER_PROGRAM = 1 << 16
MAX_PROGRAMS = 1024
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _accumulate(ptr, l0, l1, acc, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # Sum x**2 over local elements [l0, l1) of one tensor; l0 is a multiple of BLOCK. Full blocks unmasked (with
    # ALIGNED, a 16-byte divisibility hint on the addresses lets the compiler emit 16-byte vector loads), then
    # one masked tail block.
    n_full = (l1 - l0) // BLOCK
    for b in range(0, n_full):
        p = ptr + (l0 + b * BLOCK + tl.arange(0, BLOCK))
        if ALIGNED:
            p = tl.multiple_of(p, 16)
        x = tl.load(p).to(tl.float32)
        acc += x * x
    t0 = l0 + n_full * BLOCK
    if t0 < l1:
        offs = t0 + tl.arange(0, BLOCK)
        x = tl.load(ptr + offs, mask=offs < l1, other=0.0).to(tl.float32)
        acc += x * x
    return acc


@triton.jit
def _sumsq_partials_kernel(table_ptr, n_tensors, span, partials_ptr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    lo_p = pid.to(tl.int64) * span
    hi_p = lo_p + span
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n_tensors):
        addr = tl.load(table_ptr + 4 * i)
        start = tl.load(table_ptr + 4 * i + 1)
        numel = tl.load(table_ptr + 4 * i + 2)
        code = tl.load(table_ptr + 4 * i + 3)
        lo = tl.maximum(start, lo_p)
        hi = tl.minimum(start + numel, hi_p)
        if hi > lo:
            l0 = lo - start
            l1 = hi - start
            if code == 0:
                acc = _accumulate(addr.to(tl.pointer_type(tl.float32)), l0, l1, acc, BLOCK, ALIGNED)
            elif code == 1:
                acc = _accumulate(addr.to(tl.pointer_type(tl.bfloat16)), l0, l1, acc, BLOCK, ALIGNED)
            else:
                acc = _accumulate(addr.to(tl.pointer_type(tl.float16)), l0, l1, acc, BLOCK, ALIGNED)
    tl.store(partials_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _sumsq_finalize_kernel(partials_ptr, n, out_ptr, PB: tl.constexpr):
    offs = tl.arange(0, PB)
    p = tl.load(partials_ptr + offs, mask=offs < n, other=0.0).to(tl.float64)
    tl.store(out_ptr, tl.sum(p, axis=0).to(tl.float32))


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (contiguous up to a permutation): its storage span is exactly its elements."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def plan(numels: Sequence[int]) -> tuple[int, int, list[int]]:
    """(programs, span, starts) for tensors of these element counts: a function of the counts only."""
    starts, total = [], 0
    for n in numels:
        starts.append(total)
        total += _round_up(n, BLOCK)
    programs = min(MAX_PROGRAMS, max(1, -(-total // ELEMS_PER_PROGRAM)))
    span = _round_up(max(1, -(-total // programs)), BLOCK)
    return programs, span, starts


_TABLES: "OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_MAX_TABLES = 16
_CAPTURED: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # tables used inside CUDA-graph captures


def _device_table(rows: list[tuple[int, int, int, int]], device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return torch.tensor(rows, dtype=torch.int64).reshape(-1)
    key = (device.index, tuple(rows))
    capturing = torch.cuda.is_current_stream_capturing()
    hit = _CAPTURED.get(key) or _TABLES.get(key)
    if hit is None:
        host = torch.tensor(rows, dtype=torch.int64).reshape(-1).pin_memory()
        hit = (host, host.to(device, non_blocking=True))  # the pinned source stays referenced with the table
    if capturing:  # a CUDA graph will read this table at every replay: never evict it
        _CAPTURED[key] = hit
        _TABLES.pop(key, None)
    elif key not in _CAPTURED:
        _TABLES[key] = hit
        _TABLES.move_to_end(key)
        if len(_TABLES) > _MAX_TABLES:
            _TABLES.popitem(last=False)
    return hit[1]


def sumsq_partials(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stage 1 only: the (P,) float32 partial sums (one launch). Empty input gives a (1,) zero tensor."""
    device = tensors[0].device
    keep = [t if _is_dense(t) else t.contiguous() for t in tensors if t.numel() > 0]
    if not keep:
        return torch.zeros(1, dtype=torch.float32, device=device)
    programs, span, starts = plan([t.numel() for t in keep])
    rows = [(t.data_ptr(), s, t.numel(), _CODES[t.dtype]) for t, s in zip(keep, starts)]
    aligned = all(t.data_ptr() % 16 == 0 for t in keep)
    table = _device_table(rows, device)
    partials = torch.empty(programs, dtype=torch.float32, device=device)
    _sumsq_partials_kernel[(programs,)](table, len(rows), span, partials, BLOCK=BLOCK, ALIGNED=aligned, num_warps=8)
    return partials


def sumsq(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all elements as a 0-d float32 tensor (two launches)."""
    partials = sumsq_partials(tensors)
    out = torch.empty((), dtype=torch.float32, device=partials.device)
    n = partials.numel()
    _sumsq_finalize_kernel[(1,)](partials, n, out, PB=max(16, triton.next_power_of_2(n)), num_warps=4)
    return out
