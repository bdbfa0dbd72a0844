"""Hugging Face ``Trainer`` integration: gate metrics logged with the trainer's own logs.

``DGGMetricsCallback`` adds the gate's metrics to every ``Trainer.log`` call, so they reach whatever
``report_to`` integrations are configured (wandb, tensorboard, ...) and ``trainer.state.log_history``::

    from dgg_fused.integrations.hf import add_metrics_callback
    add_metrics_callback(trainer)      # puts the callback first, before the reporting callbacks

The callback finds the :class:`~dgg_fused.GatedOptimizer` through accelerate's ``AcceleratedOptimizer``
(``.optimizer``). Reading the metrics is one small device-to-host copy per *log* call, never per step.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "dgg_fused.integrations.hf needs transformers: pip install 'dgg_fused[hf]'"
    ) from exc

from . import gate_metrics, unwrap_gated

__all__ = ["DGGMetricsCallback", "add_metrics_callback", "unwrap_gated", "gate_metrics"]


class DGGMetricsCallback(TrainerCallback):
    """Adds the gate metrics (``dgg/energy``, ``dgg/statistic``, ``dgg/gated``, ``dgg/steps``, ...) to the logs.

    Besides the cumulative counters of :meth:`GatedOptimizer.get_metrics`, it logs
    ``dgg/gated_fraction``: the fraction of optimizer steps dropped since the previous log call.

    It edits the ``logs`` dict in place in ``on_log`` (and the entry ``Trainer.log`` just appended to
    ``state.log_history``), so callbacks *after* it see the metrics: register it before the reporting callbacks
    (:func:`add_metrics_callback` does).
    """

    def __init__(self, prefix: str = "dgg/") -> None:
        self.prefix = prefix
        self._last_steps = 0
        self._last_gated = 0

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None or not _is_train_log(logs):
            return
        gated = unwrap_gated(kwargs.get("optimizer"))
        if gated is None:
            return
        m = gate_metrics(gated, self.prefix)
        steps, gsteps = m[f"{self.prefix}steps"], m[f"{self.prefix}gated_steps"]
        d_steps = steps - self._last_steps
        m[f"{self.prefix}gated_fraction"] = (gsteps - self._last_gated) / d_steps if d_steps > 0 else 0.0
        self._last_steps, self._last_gated = steps, gsteps
        logs.update(m)
        hist = getattr(state, "log_history", None)
        if hist and hist[-1].get("step") == state.global_step:
            hist[-1].update(m)


def _is_train_log(logs: dict) -> bool:
    # Trainer.log is also used for eval metrics ("eval_*"); only annotate training logs.
    return not any(k.startswith("eval_") or k.startswith("test_") for k in logs)


def add_metrics_callback(trainer: Any, prefix: str = "dgg/") -> DGGMetricsCallback:
    """Register a :class:`DGGMetricsCallback` on ``trainer`` *first*, so the reporting callbacks log its metrics."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, DGGMetricsCallback):
            return cb
    cb = DGGMetricsCallback(prefix)
    trainer.callback_handler.callbacks.insert(0, cb)
    return cb
