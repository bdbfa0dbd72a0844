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

:func:`global_sumsq` is the one float64 all-reduce of a sum of squares (an empty local part contributes 0): the
DTensor / energy-group path here and the DeepSpeed ZeRO partitions (``integrations/deepspeed.py``) both use it.
:class:`dgg_fused.energy.EnergyMeter` calls :func:`global_grad_sumsq` when its plan says the energy is global
(DTensor parameters or an energy group), decided once. This module imports neither the optimizer nor the energy
module (they import it).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from .checkpoint import _as_gated, get_state_dict, set_state_dict
from .ops import grad_sumsq

__all__ = ["global_grad_sumsq", "global_sumsq", "set_energy_group", "is_dtensor", "get_state_dict", "set_state_dict"]

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


def global_sumsq(
    tensors: Sequence[torch.Tensor], *, groups: Sequence[Any] = (), device: torch.device | str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The local sum of squares of ``tensors`` in float64, all-reduced (SUM) over each of ``groups`` in turn: a
    0-d float64 tensor, no host sync.

    ``tensors`` may be empty (a rank that holds no piece): it contributes 0.0, on ``device``. Every rank of each
    group must call this at the same point (it is one collective per group), holding a piece or not. A group of
    one rank, or torch.distributed not running, reduces nothing. ``None`` in ``groups`` is the default group.
    """
    if tensors:
        e = grad_sumsq(list(tensors), backend=backend).to(torch.float64)
    elif device is not None:
        e = torch.zeros((), dtype=torch.float64, device=device)
    else:
        raise ValueError("global_sumsq: no local tensors and no device= to place the zero on")
    if dist.is_available() and dist.is_initialized():
        for g in groups:
            if dist.get_world_size(g) > 1:
                dist.all_reduce(e, op=dist.ReduceOp.SUM, group=g)
    return e


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

    parts = [
        global_sumsq(locals_, groups=[mesh.get_group(d) for d in dims], backend=backend)
        for mesh, dims, locals_ in by_layout.values()
    ]
    if plain:
        parts.append(global_sumsq(plain, groups=() if group is None else (group,), backend=backend))
    device = parts[0].device
    total = parts[0]
    for p in parts[1:]:
        total = total + p.to(device)
    return total.to(torch.float32)
