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
    mask) and :meth:`record` once before the optimizer step. Every statistic of :data:`dgg_fused.DRIFT_STATS` is
    taken over all the step's counted tokens, as :func:`dgg_fused.drift_stats` would give on their concatenation:
    token-weighted means for ``approx_kl``, ``clip_frac``, ``log_ratio_m2`` and ``tv``, the max for ``ratio_max``,
    and for ``ess`` the sums ``sum w`` and ``sum w^2`` kept relative to the largest log ratio seen so far (rescaled
    when a larger one arrives), so no weight overflows. With ``group``, the ranks' values are combined the same way
    on the device (one MAX and one SUM all-reduce), so every rank decides alike; then they go to
    :meth:`~dgg_fused.GatedOptimizer.record_drift`.
    """

    def __init__(self) -> None:
        # [kl_sum, clip_sum, m2_sum, tv_sum, tokens, w_sum, w2_sum] (w relative to exp(top)), ratio_max, top
        self._acc: list | None = None

    @property
    def empty(self) -> bool:
        """No micro-batch was added since the last :meth:`record`."""
        return self._acc is None

    @staticmethod
    def _rescale(sums, top, new_top):
        import torch

        f = torch.where(top == float("-inf"), torch.zeros_like(top), (top - new_top).exp())
        return torch.cat([sums[:5], sums[5:6] * f, sums[6:7] * f * f])

    def add(self, logp_new: Any, logp_old: Any, mask: Any, *, clip_eps: float = 0.2) -> None:
        """Add one micro-batch (see :func:`dgg_fused.drift_stats` for the arguments and their checks)."""
        import torch

        from ..drift import drift_partials

        st, count, top, s1, s2 = drift_partials(logp_new, logp_old, mask, clip_eps)  # checks the arguments
        sums = torch.stack([st["approx_kl"] * count, st["clip_frac"] * count, st["log_ratio_m2"] * count,
                            st["tv"] * count, count, s1, s2])
        a = self._acc
        if a is not None:
            new_top = torch.maximum(a[2], top)
            sums = self._rescale(a[0], a[2], new_top) + self._rescale(sums, top, new_top)
            part = [sums, torch.maximum(a[1], st["ratio_max"]), new_top]
        else:
            part = [sums, st["ratio_max"], top]
        self._acc = part

    def record(self, optimizer: Any, group: Any = None) -> None:
        """Reduce over ``group`` (when ``torch.distributed`` runs with more than one rank in it), hand the step's
        statistics to the gate behind ``optimizer``, and start the next step empty."""
        import torch
        import torch.distributed as dist

        from ..drift import ess_from_sums

        acc, self._acc = self._acc, None
        if acc is None:
            raise RuntimeError("DriftAccumulator.record: no micro-batch was added for this optimizer step")
        sums, rmax, top = acc
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            maxes = torch.stack([rmax, top])
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            rmax, new_top = maxes.unbind()
            sums = self._rescale(sums, top, new_top)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        kl_sum, clip_sum, m2_sum, tv_sum, count, s1, s2 = sums.unbind()
        n = count.clamp(min=1.0)
        unwrap_gated(optimizer).record_drift(approx_kl=kl_sum / n, clip_frac=clip_sum / n, ratio_max=rmax,
                                             ess=ess_from_sums(s1, s2, count), log_ratio_m2=m2_sum / n, tv=tv_sum / n)
