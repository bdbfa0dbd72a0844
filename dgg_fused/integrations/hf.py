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

from ..lm_head import check_tied, find_lm_head, params_of
from . import gate_metrics, unwrap_gated

__all__ = [
    "DGGMetricsCallback",
    "add_metrics_callback",
    "unwrap_gated",
    "gate_metrics",
    "warmup_optimizer_steps",
    "resolve_lm_head",
]


class DGGMetricsCallback(TrainerCallback):
    """Adds the gate metrics to the logs: :meth:`GatedOptimizer.get_metrics` under ``dgg/`` (only what the
    configured rule reads: ``dgg/energy``, ``dgg/statistic`` and ``dgg/window_filled`` for the energy rule,
    ``dgg/drift``, ``dgg/drift_statistic`` and, for a Z-score rule, ``dgg/drift_window_filled`` for a drift statistic,
    ``dgg/energy_trips`` / ``dgg/drift_trips`` with both, and always ``dgg/gated``, ``dgg/steps``, ...).

    Besides those it logs ``dgg/gated_fraction``: the fraction of optimizer steps dropped since the previous log
    call (after a resume, since the first step of this ``train()`` call: the baseline is read at
    ``on_train_begin``, after the checkpoint loaded the gate's counters). A window rule cannot act before its
    ``window_filled`` reaches ``config.window``; until then a large ``dgg/statistic`` with ``dgg/gated`` = 0 is
    expected. The end-of-training summary entry (``train_runtime``, ``train_loss``, ...) is left alone.

    It edits the ``logs`` dict in place in ``on_log`` (and the entry ``Trainer.log`` just appended to
    ``state.log_history``), so callbacks *after* it see the metrics: register it before the reporting callbacks
    (:func:`add_metrics_callback` does).
    """

    def __init__(self, prefix: str = "dgg/") -> None:
        self.prefix = prefix
        self._last_steps = 0
        self._last_gated = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        gated = unwrap_gated(kwargs.get("optimizer"))
        if gated is None:
            return
        m = gated.get_metrics()  # after a resume: the counters the checkpoint restored
        self._last_steps, self._last_gated = m["steps"], m["gated_steps"]

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None or not _is_train_log(logs):
            return
        gated = unwrap_gated(kwargs.get("optimizer"))
        if gated is None:
            return
        m = gate_metrics(gated, self.prefix)  # the one device-to-host copy of this log call
        steps, gsteps = m[f"{self.prefix}steps"], m[f"{self.prefix}gated_steps"]
        d_steps = steps - self._last_steps
        m[f"{self.prefix}gated_fraction"] = (gsteps - self._last_gated) / d_steps if d_steps > 0 else 0.0
        self._last_steps, self._last_gated = steps, gsteps
        logs.update(m)
        hist = getattr(state, "log_history", None)
        if hist and hist[-1].get("step") == state.global_step:
            hist[-1].update(m)


def _is_train_log(logs: dict) -> bool:
    # Trainer.log is also used for eval metrics ("eval_*") and for the end-of-training summary ("train_runtime",
    # "train_loss", ...); only annotate the per-step training logs.
    return not any(k.startswith(("eval_", "test_", "train_")) for k in logs)


def warmup_optimizer_steps(config: Any, steps_per_pass: int, passes: int) -> int:
    """Optimizer steps before the gate can act (0-based index of the first step on which it can trip).

    A window rule (the energy rule, a drift ``"zscore"`` rule) needs ``config.window`` reference observations: with
    ``reference="first_pass"`` only the ``steps_per_pass`` optimizer steps of each batch's first pass enter it, so
    it fills after ``ceil(window / steps_per_pass)`` rollout batches of ``steps_per_pass * passes`` steps each; with
    ``"accepted"`` / ``"all"`` every step enters. A drift ``"threshold"`` rule can act on the first reuse pass.
    With both rules, ``combine="any"`` acts as soon as either can, ``"all"`` once both can.
    """
    if config.reference == "first_pass":
        batches = -(-config.window // steps_per_pass)
        window_need = (batches - 1) * steps_per_pass * passes + steps_per_pass
    else:
        window_need = config.window
    needs = []
    if config.energy:  # the energy Z-score rule (energy_decay is a drift statistic: below)
        needs.append(window_need)
    if config.drift is not None:
        needs.append(window_need if config.drift_rule == "zscore" else steps_per_pass)
    return min(needs) if config.combine == "any" else max(needs)


def add_metrics_callback(trainer: Any, prefix: str = "dgg/") -> DGGMetricsCallback:
    """Register a :class:`DGGMetricsCallback` on ``trainer`` *first*, so the reporting callbacks log its metrics."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, DGGMetricsCallback):
            return cb
    cb = DGGMetricsCallback(prefix)
    trainer.callback_handler.callbacks.insert(0, cb)
    return cb


def resolve_lm_head(model: Any, lm_head: Any = None, *, warn_tied: bool | None = None) -> list:
    """The parameters the gate watches: the *trainable* parameters of ``model``'s output projection.

    Args:
        model: the (possibly PEFT-wrapped) model the optimizer trains.
        lm_head: ``None`` (find it with :func:`dgg_fused.find_lm_head`), a dotted module name (``"lm_head"``),
            looked up on the model as it is *now* (after PEFT wrapped it), a module, a Parameter or an iterable
            of Parameters.
        warn_tied: when the head is tied to the model's input embedding: warn (``True``;
            :class:`~dgg_fused.TiedLmHeadWarning`, once per weight), accept it silently (``False``), or leave it
            alone (``None``, the default), as :func:`dgg_fused.find_lm_head`.

    Under PEFT the output projection may be wrapped; the rule is the same everywhere — the gate watches the
    output projection's parameters that require grad:

    * ``modules_to_save=["lm_head"]``: peft's ``ModulesToSaveWrapper`` holds a frozen original and a trainable
      copy; the gate watches the copy (the full lm_head gradient, the paper's statistic).
    * ``target_modules`` containing the lm_head (LoRA on the output projection): the gate watches the head's
      adapter weights (``lora_A`` / ``lora_B``): the energy of the lm_head update the optimizer can make, not the
      full lm_head gradient. (TRL 1.16's GRPOTrainer refuses LoRA on the lm_head: it computes the
      log-probabilities from ``lm_head.weight`` directly; so the error below does not advise it.)
    * a frozen lm_head (plain LoRA on the attention / MLP layers): there is nothing to watch; ``ValueError`` says
      what works: ``modules_to_save=["lm_head"]``, or a drift-only gate, which reads no lm_head.

    Returns the list of Parameters. Raises ``ValueError`` when the name does not exist or nothing is trainable.
    """
    what = "the output projection"
    if lm_head is None:
        head = find_lm_head(model, warn_tied=None)
        what = f"the output projection ({type(head).__name__}, found by find_lm_head)"
    elif isinstance(lm_head, str):
        head = _get_submodule(model, lm_head)
        what = f"module {lm_head!r} ({type(head).__name__})"
    else:
        head = lm_head
    every = params_of(head)
    if warn_tied is not None:
        check_tied(model, every, warn=warn_tied)
    params, total = [p for p in every if p.requires_grad], len(every)
    if not params:
        raise ValueError(
            f"{what} has {total} parameter(s) and none of them is trainable, so the gate has no lm_head gradient to "
            "watch (with PEFT/LoRA the base lm_head is frozen). Either make the head trainable: "
            "LoraConfig(..., modules_to_save=['lm_head']) (the gate watches the trainable copy, the full lm_head "
            "gradient), or gate on policy drift alone, which reads no lm_head: GateConfig.recommended() "
            "(DGGGRPOConfig: --dgg_preset recommended)."
        )
    return params


def _get_submodule(model: Any, name: str) -> Any:
    """``model.get_submodule(name)``, also trying the wrapped model under PEFT (``base_model.model.<name>``)."""
    tried = []
    m = model
    for _ in range(4):
        try:
            return m.get_submodule(name)
        except AttributeError:
            tried.append(type(m).__name__)
        nxt = getattr(m, "base_model", None)
        if nxt is None or nxt is m:
            nxt = getattr(m, "model", None)
        if nxt is None or nxt is m:
            break
        m = nxt
    try:
        found = find_lm_head(model, warn_tied=None)
        hint = next((f"; its output projection is {n!r}" for n, mod in model.named_modules() if mod is found), "")
    except ValueError:
        hint = ""
    raise ValueError(f"lm_head={name!r}: no such submodule in {' or '.join(tried)}{hint}")
