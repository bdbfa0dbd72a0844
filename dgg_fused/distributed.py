"""Global lm_head gradient energy for sharded gradients: DTensor / FSDP2, tensor-parallel lm_heads, DDP.

The gate must see the energy of the *whole* lm_head gradient, and every rank must take the same decision. This
module computes that global energy without a host sync:

* **DDP** needs nothing: after ``backward()`` every rank holds the same all-reduced gradient, so the local energy
  already is the global one (and is bit-identical on every rank).
* **DTensor gradients** (FSDP2 ``fully_shard``, ``torch.distributed.tensor.parallel`` e.g. ``ColwiseParallel`` on
  the lm_head): the local sum of squares of each shard (``to_local()``: uneven splits and empty shards are fine)
  is all-reduced (SUM, float64) over the process group of every mesh dimension on which the tensor is ``Shard``-ed;
  ``Replicate`` dimensions are not summed (each rank already holds the full value); a ``Partial`` gradient is
  first reduced to ``Replicate`` (its sum of squares is not the sum of its parts' squares).
* **Plain tensors sharded by hand** (a Megatron-style vocab-parallel lm_head): tell the optimizer the group with
  :func:`set_energy_group` (or ``opt.energy_group = group``); the local sum of squares of all non-DTensor lm_head
  gradients is all-reduced over it. Every such tensor must be *partitioned* over the group (no replicated copies:
  those would be counted once per rank).
* **Tied embeddings under FSDP2**: shard the tied pair together (apply ``fully_shard`` to a module that holds
  both the embedding and the lm_head, e.g. the root), so the shared weight is one DTensor; its gradient carries
  both roles (see :func:`dgg_fused.find_lm_head`).

The all-reduce is issued on the gradients' device (NCCL: on the current stream, nothing waits on the host); the
result is bit-identical on every rank, so the gate's decisions are too. Build the optimizer and the
:class:`~dgg_fused.GatedOptimizer` *after* ``fully_shard`` / ``parallelize_module`` (they replace the parameters).

**Checkpoints with torch.distributed.checkpoint (DCP):** :func:`get_state_dict` / :func:`set_state_dict` (defined
in :mod:`dgg_fused.checkpoint`, re-exported here).

:class:`dgg_fused.energy.EnergyMeter` calls :func:`global_grad_sumsq` for DTensor gradients and an energy group;
without them it is exactly :func:`dgg_fused.grad_sumsq`. This module imports neither the optimizer nor the energy
module (they import it).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from .checkpoint import _as_gated, get_state_dict, set_state_dict
from .ops import grad_sumsq

__all__ = ["global_grad_sumsq", "set_energy_group", "is_dtensor", "get_state_dict", "set_state_dict"]

try:  # DTensor is public since torch 2.4; a build without distributed support has none.
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def set_energy_group(optimizer: Any, group: Any) -> None:
    """Make ``optimizer`` (a :class:`~dgg_fused.GatedOptimizer`) all-reduce the energy of its plain-tensor lm_head
    gradients over ``group`` (a vocab-parallel lm_head sharded by hand). ``None`` turns it off.

    DTensor gradients need no group: their mesh says where they are sharded. Same as ``optimizer.energy_group =
    group`` or the ``energy_group=`` constructor argument.
    """
    try:
        _as_gated(optimizer)
    except TypeError:
        raise TypeError(f"set_energy_group expects a GatedOptimizer, got {type(optimizer).__name__}") from None
    optimizer.energy_group = group


def _shard_dims(t: Any) -> tuple[int, ...]:
    return tuple(i for i, p in enumerate(t.placements) if p.is_shard())


def global_grad_sumsq(
    tensors: Sequence[torch.Tensor], *, backend: str = "auto", group: Any = None
) -> torch.Tensor:
    """Sum of squares of the global tensors whose local pieces are ``tensors``: 0-d float32, no host sync.

    Args:
        tensors: plain tensors and/or DTensors (all local pieces on one device).
        backend: energy backend for the local sums (:func:`dgg_fused.grad_sumsq`).
        group: process group over which the *plain* tensors are partitioned (``None``: they are not sharded).

    Every rank that holds a shard must call this (it issues collectives), in the same order of tensors.
    """
    ts = list(tensors) if not isinstance(tensors, torch.Tensor) else [tensors]
    has_dt = any(is_dtensor(t) for t in ts)
    if not has_dt and group is None:
        return grad_sumsq(ts, backend=backend)  # the single-process / DDP path, unchanged

    plain: list[torch.Tensor] = []
    # (mesh, shard mesh-dims) -> local pieces; tensors sharded the same way share one all-reduce
    by_layout: dict[tuple[int, tuple[int, ...]], tuple[Any, tuple[int, ...], list[torch.Tensor]]] = {}
    for t in ts:
        if not is_dtensor(t):
            plain.append(t)
            continue
        if any(p.is_partial() for p in t.placements):
            t = t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])
        dims = _shard_dims(t)
        key = (id(t.device_mesh), dims)
        by_layout.setdefault(key, (t.device_mesh, dims, []))[2].append(t.to_local())

    parts: list[torch.Tensor] = []
    for mesh, dims, locals_ in by_layout.values():
        e = grad_sumsq(locals_, backend=backend).to(torch.float64)
        for d in dims:
            dist.all_reduce(e, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        parts.append(e)
    if plain:
        e = grad_sumsq(plain, backend=backend).to(torch.float64)
        if group is not None:
            dist.all_reduce(e, op=dist.ReduceOp.SUM, group=group)
        parts.append(e)
    device = parts[0].device
    total = parts[0]
    for p in parts[1:]:
        total = total + p.to(device)
    return total.to(torch.float32)
