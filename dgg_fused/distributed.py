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

**Checkpoints with torch.distributed.checkpoint (DCP):** use :func:`get_state_dict` / :func:`set_state_dict` here
instead of torch's ``torch.distributed.checkpoint.state_dict`` functions with the wrapper. Torch's versions would
drop the gate's ``"dgg"`` entry, and on a fresh optimizer they initialise the state by calling ``step()`` once with
zero gradients -- through the gate, which would count that step and put a zero energy in its window.

:meth:`GatedOptimizer._measure_energy` calls :func:`global_grad_sumsq`; without DTensors and without an energy group
it is exactly :func:`dgg_fused.grad_sumsq`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

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

    DTensor gradients need no group: their mesh says where they are sharded.
    """
    from .optimizer import GatedOptimizer

    if not isinstance(optimizer, GatedOptimizer):
        raise TypeError(f"set_energy_group expects a GatedOptimizer, got {type(optimizer).__name__}")
    if group is not None and not dist.is_initialized():
        raise RuntimeError("set_energy_group: torch.distributed is not initialized")
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


def get_state_dict(model: torch.nn.Module, optimizer: Any, *, options: Any = None) -> tuple[dict, dict]:
    """``torch.distributed.checkpoint.state_dict.get_state_dict`` for a :class:`~dgg_fused.GatedOptimizer`.

    Returns ``(model_state_dict, optim_state_dict)``: torch's FQN-keyed (sharded) state dicts of the model and of the
    *inner* optimizer, plus the gate's state under ``optim_state_dict["dgg"]`` (small plain tensors, identical on
    every rank). Save them with ``torch.distributed.checkpoint.save``; to resume, build the same structure on the
    fresh model/optimizer with this function, ``dcp.load`` into it, then call :func:`set_state_dict`.
    """
    from torch.distributed.checkpoint import state_dict as dcp_sd

    gated = _as_gated(optimizer)
    msd, osd = dcp_sd.get_state_dict(model, gated.optimizer, options=options)
    osd = dict(osd)
    osd[_DGG_KEY] = gated.state_dict()[_DGG_KEY]
    return msd, osd


def set_state_dict(
    model: torch.nn.Module, optimizer: Any, *, model_state_dict: dict, optim_state_dict: dict, options: Any = None
) -> None:
    """Inverse of :func:`get_state_dict`: load the model, the inner optimizer and the gate."""
    from torch.distributed.checkpoint import state_dict as dcp_sd

    gated = _as_gated(optimizer)
    osd = dict(optim_state_dict)
    dgg = osd.pop(_DGG_KEY, None)
    dcp_sd.set_state_dict(
        model, gated.optimizer, model_state_dict=model_state_dict, optim_state_dict=osd, options=options
    )
    if dgg is not None:  # validated (window, format) before anything of the gate is written
        gated.load_state_dict({**gated.optimizer.state_dict(), _DGG_KEY: dgg})


_DGG_KEY = "dgg"


def _as_gated(optimizer: Any) -> Any:
    from .optimizer import GatedOptimizer

    if not isinstance(optimizer, GatedOptimizer):
        raise TypeError(f"expected a GatedOptimizer, got {type(optimizer).__name__}")
    return optimizer
