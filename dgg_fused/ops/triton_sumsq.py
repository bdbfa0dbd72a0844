"""Triton backend of :func:`dgg_fused.ops.grad_sumsq`: a multi-tensor, one-wave persistent, two-stage reduction.

Work and grid are decoupled, so the grid can fit the GPU while the bits cannot depend on it:

* **Tiles** (the work, a function of the element counts only): the tensors are laid end to end in a padded
  "global element space" (each tensor's start rounded up to a multiple of ``PAD``), cut into ``T`` tiles of
  ``span`` elements (:func:`plan`: ~``ELEMS_PER_TILE`` each, at most ``MAX_TILES``). Tile ``t``'s sum of squares,
  in a fixed order, is written to ``partials[t]``.
* **Programs** (the grid): ``G = min(T, resident slots)``: exactly the blocks the GPU holds at once (SM count x
  blocks per SM from the compiled kernel's registers and shared memory, :func:`resident_programs`), so there is one
  wave and no low-occupancy tail wave. Program ``p`` takes tiles ``p, p + G, p + 2G, ...``; tiles are small
  (``T >> G`` on large inputs), so the last round is short.

Inside a tile (``_sumsq_partials_kernel``) each program loads ``UNROLL`` sub-blocks of ``SUB`` elements before
using any of them: with 8 warps that is 4 x 16-byte loads in flight per thread for bf16/fp16 and 8 for fp32
(``ld.global.v4`` when every base address is 16-byte aligned; a divisibility hint tells the compiler so). Values
are cast to float32 right after ``tl.load`` (the accumulation type; the interpreter also gets bf16 arithmetic
wrong otherwise). Offsets are int64 from the tile base on (tensors of more than 2**31 elements): the base
``span * t`` is the one product widened explicitly (Triton passes ``span`` as int32 when it fits); the tile and
table indices stay 32-bit. A per-tensor dtype code
picks the load type, so one launch covers any number of tensors and all three dtypes.

Stage 2 (``_sumsq_finalize_kernel``, and the fused gate epilogue, which reduces the partials itself): one program
adds the ``T`` partials in float64 in a fixed order (:func:`sum_partials`), then rounds once to float32.

Tables (per-tensor start/numel/dtype and per-tile first/last tensor; the tensor addresses in a separate table)
live on the device. The layout table depends on the element counts and dtypes only and is built once per layout;
the address table is built per distinct set of addresses and a few are kept per layout, so training loops that
reallocate their gradients every step (``zero_grad(set_to_none=True)``: the caching allocator hands back the same
few blocks) do no host-to-device traffic after the first steps. Tables are copied from pinned memory without a sync
(the pinned staging buffer is returned to torch's caching host allocator at once, not kept). Tables a CUDA graph
reads are kept for the life of the process (device memory; a few KB each, one per distinct captured layout and
address set); a capture that finds them already built (a warm-up step before capture, as usual) adds no copy to
the graph and keeps no pinned memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["sumsq", "sumsq_partials", "plan", "resident_programs", "partials_block"]

SUB = 2048  # elements per load of one program (8 warps: 8 elements = 16 bytes per thread for bf16/fp16)
UNROLL = 4  # sub-blocks loaded before any is used
PAD = SUB  # tensor starts and tile spans are multiples of this
ELEMS_PER_TILE = 1 << 15
MAX_TILES = 1 << 14
NUM_WARPS = 8
MAX_PARTIALS_BLOCK = 1024
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _accumulate(ptr, l0, l1, acc, SUB: tl.constexpr, UNROLL: tl.constexpr, ALIGNED: tl.constexpr):
    # Sum x**2 over local elements [l0, l1) of one tensor into acc (SUB lanes); l0 is a multiple of SUB. Groups of
    # UNROLL full sub-blocks unmasked, all loads issued before the first use; then single full sub-blocks; then one
    # masked sub-block (only at a tensor's end: tile spans are multiples of UNROLL * SUB, tensor starts of SUB).
    tl.static_assert(UNROLL == 4)
    n_groups = (l1 - l0) // (UNROLL * SUB)
    for b in range(0, n_groups):
        p0 = ptr + (l0 + b * (UNROLL * SUB) + tl.arange(0, SUB))
        if ALIGNED:
            p0 = tl.multiple_of(p0, 16)
        x0 = tl.load(p0)
        x1 = tl.load(p0 + SUB)
        x2 = tl.load(p0 + 2 * SUB)
        x3 = tl.load(p0 + 3 * SUB)
        y0 = x0.to(tl.float32)
        acc += y0 * y0
        y1 = x1.to(tl.float32)
        acc += y1 * y1
        y2 = x2.to(tl.float32)
        acc += y2 * y2
        y3 = x3.to(tl.float32)
        acc += y3 * y3
    s0 = l0 + n_groups * (UNROLL * SUB)
    n_full = (l1 - s0) // SUB
    for b in range(0, n_full):
        p = ptr + (s0 + b * SUB + tl.arange(0, SUB))
        if ALIGNED:
            p = tl.multiple_of(p, 16)
        x = tl.load(p).to(tl.float32)
        acc += x * x
    t0 = s0 + n_full * SUB
    if t0 < l1:
        offs = t0 + tl.arange(0, SUB)
        x = tl.load(ptr + offs, mask=offs < l1, other=0.0).to(tl.float32)
        acc += x * x
    return acc


@triton.jit
def _sumsq_partials_kernel(
    addr_ptr, layout_ptr, n_tensors, n_tiles, span, partials_ptr,
    SUB: tl.constexpr, UNROLL: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    # layout: n_tensors rows (start, numel, dtype code), then n_tiles rows (first tensor, last tensor).
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    tiles = layout_ptr + 3 * n_tensors
    for t in range(pid, n_tiles, n_prog):
        # The tile base is the one 64-bit product: Triton passes `span` as int32 whenever it fits, and int32
        # `span * t` wraps past 2**31 elements (an H200 run lost every element from the tile straddling 2**31 on).
        # Everything downstream (tensor starts from the int64 table, local offsets, pointers) is int64 from here.
        lo_t = span.to(tl.int64) * t
        hi_t = lo_t + span
        first = tl.load(tiles + 2 * t)
        last = tl.load(tiles + 2 * t + 1)
        acc = tl.zeros([SUB], dtype=tl.float32)
        for i in range(first, last + 1):
            addr = tl.load(addr_ptr + i)
            start = tl.load(layout_ptr + 3 * i)
            numel = tl.load(layout_ptr + 3 * i + 1)
            code = tl.load(layout_ptr + 3 * i + 2)
            lo = tl.maximum(start, lo_t)
            hi = tl.minimum(start + numel, hi_t)
            if hi > lo:
                l0 = lo - start
                l1 = hi - start
                if code == 0:
                    acc = _accumulate(addr.to(tl.pointer_type(tl.float32)), l0, l1, acc, SUB, UNROLL, ALIGNED)
                elif code == 1:
                    acc = _accumulate(addr.to(tl.pointer_type(tl.bfloat16)), l0, l1, acc, SUB, UNROLL, ALIGNED)
                else:
                    acc = _accumulate(addr.to(tl.pointer_type(tl.float16)), l0, l1, acc, SUB, UNROLL, ALIGNED)
        tl.store(partials_ptr + t, tl.sum(acc, axis=0))


@triton.jit
def sum_partials(partials_ptr, n, PB: tl.constexpr):
    """float64 sum of partials[0..n) in a fixed order: PB lanes (lane j adds j, j + PB, ...), then a fixed tree.
    The finalize kernel and the fused gate epilogue both use it with ``PB = partials_block(n)``, so they agree
    bit for bit."""
    offs = tl.arange(0, PB)
    acc = tl.zeros([PB], dtype=tl.float64)
    for c in range(0, n, PB):
        acc += tl.load(partials_ptr + c + offs, mask=c + offs < n, other=0.0).to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit
def _sumsq_finalize_kernel(partials_ptr, n, out_ptr, PB: tl.constexpr):
    tl.store(out_ptr, sum_partials(partials_ptr, n, PB).to(tl.float32))


def partials_block(n: int) -> int:
    """The lane count of :func:`sum_partials` for ``n`` partials (a power of two, 16 to 1024)."""
    return min(MAX_PARTIALS_BLOCK, max(16, triton.next_power_of_2(max(1, n))))


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
    """(tiles, span, starts) for tensors of these element counts: a function of the counts only (never of the GPU),
    so the same input gives the same bits anywhere."""
    starts, total = [], 0
    for n in numels:
        starts.append(total)
        total += _round_up(n, PAD)
    tiles = min(MAX_TILES, max(1, -(-total // ELEMS_PER_TILE)))
    span = _round_up(max(1, -(-total // tiles)), UNROLL * SUB)
    tiles = max(1, -(-total // span))  # rounding span up can leave trailing tiles empty: drop them
    return tiles, span, starts


def resident_programs(
    n_regs: int, shared: int, num_warps: int, *, sms: int, regs_per_sm: int = 65536, max_threads_per_sm: int = 2048,
    shared_per_sm: int = 233472, max_blocks_per_sm: int = 32, reserved_shared_per_block: int = 1024,
) -> int:
    """Blocks of a kernel the GPU holds at once (one wave): ``sms`` x blocks per SM, the CUDA occupancy rule
    (registers allocated per warp in units of 256, shared memory plus the 1 KiB the driver reserves per block).
    Defaults are sm_90 (H100/H200)."""
    threads = 32 * num_warps
    regs_per_warp = _round_up(max(n_regs, 1) * 32, 256)
    by_regs = regs_per_sm // (regs_per_warp * num_warps)
    by_threads = max_threads_per_sm // threads
    by_shared = shared_per_sm // (shared + reserved_shared_per_block)
    return sms * max(1, min(max_blocks_per_sm, by_regs, by_threads, by_shared))


# -------------------------------------------------------------------------------------------------- grid size
_SLOTS: dict[tuple, int] = {}  # (device index, ALIGNED) -> resident programs, from the compiled kernel


def _grid(tiles: int, device: torch.device, aligned: bool, programs: int | None) -> int:
    if programs is not None:
        return max(1, min(tiles, int(programs)))
    if device.type != "cuda":  # the interpreter: one program per tile
        return tiles
    slots = _SLOTS.get((device.index, aligned))
    if slots is None:  # first launch, before the kernel's registers are known: 4 blocks per SM
        slots = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, slots))


def _learn_slots(kernel, device: torch.device, aligned: bool) -> None:
    """Record the one-wave grid of the compiled kernel (registers and shared memory are known after a launch)."""
    key = (device.index, aligned)
    if key in _SLOTS or device.type != "cuda":
        return
    try:
        kernel._init_handles()
        props = torch.cuda.get_device_properties(device)
        _SLOTS[key] = resident_programs(
            int(kernel.n_regs), int(kernel.metadata.shared), int(kernel.metadata.num_warps),
            sms=props.multi_processor_count,
            regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536) or 65536,
            max_threads_per_sm=getattr(props, "max_threads_per_multi_processor", 2048) or 2048,
            shared_per_sm=getattr(props, "shared_memory_per_multiprocessor", 233472) or 233472,
        )
    except Exception:  # another Triton version's kernel object: keep the conservative 4 blocks per SM
        _SLOTS[key] = 4 * torch.cuda.get_device_properties(device).multi_processor_count


# -------------------------------------------------------------------------------------------------- tables
class _Layout:
    """Device tables of one layout (element counts and dtypes): per-tensor rows and per-tile first/last tensor,
    plus the last few address tables seen with it."""

    MAX_ADDRESS_SETS = 4

    def __init__(self, numels: list[int], codes: list[int], device: torch.device) -> None:
        self.tiles, self.span, starts = plan(numels)
        rows: list[int] = []
        for s, n, c in zip(starts, numels, codes):
            rows += (s, n, c)
        # tile t covers [t * span, (t + 1) * span): its first tensor is the last one starting at or before its
        # start, its last tensor the last one starting before its end (tensor starts are strictly increasing)
        st = torch.tensor(starts, dtype=torch.int64)
        lo = torch.arange(self.tiles, dtype=torch.int64) * self.span
        first = torch.searchsorted(st, lo, right=True) - 1
        last = torch.searchsorted(st, lo + self.span, right=False) - 1
        rows += torch.stack([first, last], dim=1).reshape(-1).tolist()
        self.n = len(numels)
        self.table = _to_device(rows, device)
        self.addresses: "OrderedDict[tuple[int, ...], torch.Tensor]" = OrderedDict()

    def address_table(self, addrs: tuple[int, ...], device: torch.device) -> torch.Tensor:
        hit = self.addresses.get(addrs)
        if hit is None:
            hit = _to_device(list(addrs), device)
            self.addresses[addrs] = hit
            if len(self.addresses) > self.MAX_ADDRESS_SETS:
                self.addresses.popitem(last=False)
        else:
            self.addresses.move_to_end(addrs)
        return hit


_LAYOUTS: "OrderedDict[tuple, _Layout]" = OrderedDict()
_MAX_LAYOUTS = 16
#: Tables read by captured CUDA graphs: never freed (a graph replays its kernels with these addresses).
_CAPTURED: "dict[tuple, tuple[_Layout, torch.Tensor]]" = {}


#: Pinned sources of table copies made while a CUDA graph was being captured: the graph's copy node re-reads them
#: at every replay. Empty when tables are built before capture (a warm-up step), as usual.
_PINNED_FOR_GRAPHS: list[torch.Tensor] = []


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    # Pinned + non_blocking: no sync. torch's caching host allocator keeps the pinned block until the copy has run,
    # then reuses it, so dropping `host` here neither races the copy nor accumulates pinned memory.
    host = host.pin_memory()
    if torch.cuda.is_current_stream_capturing():
        _PINNED_FOR_GRAPHS.append(host)
    return host.to(device, non_blocking=True)


def _tables(numels: list[int], codes: list[int], addrs: tuple[int, ...], device: torch.device):
    """(layout, address table) for these tensors: built on first use, then cached (see the module docstring)."""
    key = (device.type, device.index, tuple(numels), tuple(codes))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing and (key, addrs) in _CAPTURED:
        return _CAPTURED[(key, addrs)]
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _LAYOUTS[key] = _Layout(numels, codes, device)
        if len(_LAYOUTS) > _MAX_LAYOUTS:
            _LAYOUTS.popitem(last=False)
    else:
        _LAYOUTS.move_to_end(key)
    hit = (layout, layout.address_table(addrs, device))
    if capturing:  # the graph will read both tables at every replay: never free them
        _CAPTURED[(key, addrs)] = hit
    return hit


# -------------------------------------------------------------------------------------------------- entry points
def sumsq_partials(tensors: Sequence[torch.Tensor], *, programs: int | None = None) -> torch.Tensor:
    """Stage 1 only: the (T,) float32 tile sums (one launch). Empty input gives a (1,) zero tensor.

    ``programs`` overrides the grid (default: the GPU's resident slots; one program per tile under the
    interpreter). The result does not depend on it: it only changes which program sums which tile."""
    device = tensors[0].device
    keep = [t for t in tensors if t.numel() > 0]
    if not all([t.is_contiguous() for t in keep]):
        keep = [t if _is_dense(t) else t.contiguous() for t in keep]
    if not keep:
        return torch.zeros(1, dtype=torch.float32, device=device)
    numels = [t.numel() for t in keep]
    codes = [_CODES[t.dtype] for t in keep]
    addrs = tuple([t.data_ptr() for t in keep])
    aligned = not any([a & 15 for a in addrs])
    layout, addr_table = _tables(numels, codes, addrs, device)
    partials = torch.empty(layout.tiles, dtype=torch.float32, device=device)
    grid = _grid(layout.tiles, device, aligned, programs)
    kernel = _sumsq_partials_kernel[(grid,)](
        addr_table, layout.table, layout.n, layout.tiles, layout.span, partials,
        SUB=SUB, UNROLL=UNROLL, ALIGNED=aligned, num_warps=NUM_WARPS,
    )  # fmt: skip
    if device.type == "cuda" and (device.index, aligned) not in _SLOTS:
        _learn_slots(kernel, device, aligned)
    return partials


def sumsq(tensors: Sequence[torch.Tensor], *, programs: int | None = None) -> torch.Tensor:
    """Sum of squares of all elements as a 0-d float32 tensor (two launches)."""
    partials = sumsq_partials(tensors, programs=programs)
    out = torch.empty((), dtype=torch.float32, device=partials.device)
    n = partials.numel()
    _sumsq_finalize_kernel[(1,)](partials, n, out, PB=partials_block(n), num_warps=4)
    return out
