"""Integrations with training stacks. Each submodule imports its framework itself; importing this package imports
nothing optional, so ``import dgg_fused`` never needs TRL, transformers or accelerate.

* :mod:`dgg_fused.integrations.hf`  -- Hugging Face ``Trainer`` / accelerate: unwrap the gated optimizer, a metrics
  callback, a plain metrics dict for any logger.
* :mod:`dgg_fused.integrations.trl` -- TRL ``GRPOTrainer`` with rollout reuse (``num_iterations`` = K) under DGG, and
  ``DGGGRPOConfig`` (the gate's settings from the command line / YAML).
* :mod:`dgg_fused.integrations.deepspeed` -- DeepSpeed ZeRO-1/2/3: the gate as the engine's client optimizer.
* :mod:`dgg_fused.integrations.verl` -- verl's FSDP2 engine and training worker, loaded as a verl plugin.
"""

from __future__ import annotations

from typing import Any

__all__ = ["unwrap_gated", "gate_metrics", "DriftAccumulator"]


def unwrap_gated(optimizer: Any) -> Any:
    """Return the :class:`~dgg_fused.GatedOptimizer` inside ``optimizer``, or ``None``.

    Follows ``.optimizer`` links (accelerate's ``AcceleratedOptimizer``, and similar wrappers) at most 8 deep, so
    ``unwrap_gated(trainer.optimizer)`` reaches the wrapper that accelerate hides.
    """
    from ..optimizer import GatedOptimizer

    opt = optimizer
    for _ in range(8):
        if isinstance(opt, GatedOptimizer):
            return opt
        opt = getattr(opt, "optimizer", None)
        if opt is None:
            return None
    return None


def gate_metrics(optimizer: Any, prefix: str = "dgg/") -> dict[str, float | int]:
    """The gate's metrics as a plain ``{prefix + name: number}`` dict for any logger (wandb, tensorboard, print).

    ``optimizer`` may be a :class:`~dgg_fused.GatedOptimizer` or anything wrapping one (accelerate). This reads
    device values (one small sync): call it when you log, not every step. Returns ``{}`` when no gated optimizer
    is found.
    """
    gated = unwrap_gated(optimizer)
    if gated is None:
        return {}
    return {f"{prefix}{k}": v for k, v in gated.get_metrics().items()}


class DriftAccumulator:
    """Policy-drift statistics of one optimizer step, over its micro-batches and data-parallel ranks.

    A trainer calls :meth:`add` for every micro-batch (current and rollout per-token log-probabilities, the token
    mask) and :meth:`record` once before the optimizer step: the token-weighted means of ``approx_kl`` and
    ``clip_frac`` and the max of ``ratio_max`` over every micro-batch and, with ``group``, every rank (one SUM and one
    MAX all-reduce, on the device) go to :meth:`~dgg_fused.GatedOptimizer.record_drift`, so every rank decides alike.
    """

    def __init__(self) -> None:
        self._acc: list | None = None  # [kl_sum, clip_sum, tokens, ratio_max]

    @property
    def empty(self) -> bool:
        """No micro-batch was added since the last :meth:`record`."""
        return self._acc is None

    def add(self, logp_new: Any, logp_old: Any, mask: Any, *, clip_eps: float = 0.2) -> None:
        """Add one micro-batch (see :func:`dgg_fused.drift_stats` for the arguments)."""
        import torch

        from ..drift import drift_stats

        st = drift_stats(logp_new, logp_old, mask, clip_eps=clip_eps)
        n = (mask != 0).sum().to(torch.float32)
        part = [st["approx_kl"] * n, st["clip_frac"] * n, n, st["ratio_max"]]
        a = self._acc
        if a is not None:
            part = [a[0] + part[0], a[1] + part[1], a[2] + part[2], torch.maximum(a[3], part[3])]
        self._acc = part

    def record(self, optimizer: Any, group: Any = None) -> None:
        """Reduce over ``group`` (when ``torch.distributed`` runs with more than one rank in it), hand the step's
        statistics to the gate behind ``optimizer``, and start the next step empty."""
        import torch
        import torch.distributed as dist

        acc, self._acc = self._acc, None
        if acc is None:
            raise RuntimeError("DriftAccumulator.record: no micro-batch was added for this optimizer step")
        kl_sum, clip_sum, n, rmax = acc
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            sums = torch.stack([kl_sum, clip_sum, n])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(rmax, op=dist.ReduceOp.MAX, group=group)
            kl_sum, clip_sum, n = sums.unbind()
        n = n.clamp(min=1.0)
        unwrap_gated(optimizer).record_drift(approx_kl=kl_sum / n, clip_frac=clip_sum / n, ratio_max=rmax)
