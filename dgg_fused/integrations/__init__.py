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

__all__ = ["unwrap_gated", "gate_metrics"]


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
