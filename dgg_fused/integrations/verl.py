"""verl (FSDP2 engine): DGG on the PPO / GRPO actor update, turned on by configuration.

verl loads this module in every process as a plugin::

    export VERL_USE_EXTERNAL_MODULES=dgg_fused.integrations.verl     # (or the "verl.plugins" entry point)
    python -m verl.trainer.main_ppo ... \\
        actor_rollout_ref.actor.strategy=fsdp2 \\
        actor_rollout_ref.actor.ppo_epochs=4 \\
        +actor_rollout_ref.actor.optim.override_optimizer_config.fused=true \\
        +actor_rollout_ref.actor.optim.override_optimizer_config.dgg.tau=0.3 \\
        +actor_rollout_ref.actor.optim.override_optimizer_config.dgg.max_reuse=4

Importing it registers :class:`DGGFSDPEngine` as verl's ``language_model`` / ``fsdp2`` engine and
:class:`DGGTrainingWorker` as ``ActorRolloutRefWorker.actor_worker_cls``. Both behave exactly like verl's own
classes unless the optimizer config carries a ``dgg`` entry (the :class:`~dgg_fused.GateConfig` fields, e.g.
``{"tau": 0.3, "window": 8, "max_reuse": 4}``; ``{}`` for the defaults), which verl's optimizer never sees.

What it does in verl's update loop (verl 0.9.1 names):

* **The optimizer.** ``FSDPEngine._build_optimizer`` builds verl's optimizer (``optim.optimizer`` /
  ``optimizer_impl``; torch's AdamW with ``fused=true`` takes the sync-free path) and wraps it in a
  :class:`~dgg_fused.GatedOptimizer` watching the model's output projection (:func:`dgg_fused.find_lm_head`);
  under FSDP2 its gradient is a sharded DTensor and the energy is all-reduced (:mod:`dgg_fused.distributed`), so
  every rank takes the same decision.
* **Energy before clipping.** ``FSDPEngine.optimizer_step`` clips, then steps; :class:`DGGFSDPEngine` records the
  energy first (divided by the GradScaler's scale when there is one).
* **k from the mini-batch index.** ``TrainingWorker.train_mini_batch`` runs ``ppo_epochs`` passes over the
  rollout batch split into mini-batches; the mini-batch ``i`` (0-based, in iteration order) belongs to pass
  ``k = i // mini_batches_per_pass + 1``. :class:`DGGTrainingWorker` sets it before every mini-batch.
* **Early exit.** Once the gate tripped, the remaining mini-batches of the update are not run at all (no forward,
  no backward, no optimizer step); the LR scheduler still steps where verl would step it. Every rank sees the same
  decision, so every rank skips the same mini-batches.
* **Metrics.** ``dgg/*`` (the gate's counters and last values, plus ``dgg/skipped_mini_batches`` and
  ``dgg/passes_run`` of this update) are added to the update's metrics, which verl logs with its own.
* **Drift signal.** With ``dgg: {drift: approx_kl, drift_threshold: 0.02}`` (optionally ``energy: false``) the
  worker's loss is wrapped: every micro-batch's :func:`dgg_fused.drift_stats` of the current log-probabilities
  against ``old_log_probs`` over ``response_mask`` is summed (token-weighted) over the mini-batch, reduced over the
  data-parallel group, and handed to the gate before the optimizer step.
* **Checkpoints.** verl's FSDP checkpoint manager saves ``optimizer.state_dict()`` per rank: the gate's state
  rides along under ``"dgg"`` and comes back with ``load_checkpoint``.

Only the new-style workers (``verl.workers.engine_workers``, ``use_legacy_worker_impl=disable``) and the FSDP2
strategy are covered. Tested on CPU with gloo (1 and 2 ranks) through a CPU platform the test defines; verl itself
does not ship a CPU platform.
"""

from __future__ import annotations

import dataclasses
from typing import Any

try:
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("dgg_fused.integrations.verl needs verl (tested with verl 0.9.1, FSDP2 engine)") from exc

import torch

from ..config import GateConfig
from ..lm_head import find_lm_head
from ..optimizer import GatedOptimizer
from . import DriftAccumulator, gate_metrics, unwrap_gated

__all__ = ["DGGFSDPEngine", "DGGTrainingWorker", "register", "SUPPORTED_VERL"]

#: The verl version this integration is written against.
SUPPORTED_VERL = "0.9.1"

_CONFIG_KEY = "dgg"


def gate_config_from(optimizer_config: Any) -> GateConfig | None:
    """The :class:`~dgg_fused.GateConfig` in ``optim.override_optimizer_config["dgg"]``, or None (DGG off)."""
    over = getattr(optimizer_config, "override_optimizer_config", None) or {}
    if _CONFIG_KEY not in over:
        return None
    raw = over[_CONFIG_KEY]
    raw = {} if raw is None else dict(raw)
    try:
        return GateConfig.from_dict(raw)
    except ValueError as exc:
        raise ValueError(f"optim.override_optimizer_config.{_CONFIG_KEY}: {exc}") from None


class DGGFSDPEngine(FSDPEngineWithLMHead):
    """verl's FSDP/FSDP2 language-model engine with a :class:`~dgg_fused.GatedOptimizer` when configured."""

    #: the drift statistics of the current mini-batch (filled by the worker's loss wrapper, used by optimizer_step)
    dgg_drift: DriftAccumulator | None = None

    def _build_optimizer(self, module: Any) -> Any:
        cfg = gate_config_from(self.optimizer_config)
        if cfg is None:
            return super()._build_optimizer(module)
        from verl.workers.config.optimizer import build_optimizer

        over = {k: v for k, v in (self.optimizer_config.override_optimizer_config or {}).items() if k != _CONFIG_KEY}
        inner_cfg = dataclasses.replace(self.optimizer_config, override_optimizer_config=over or None)
        inner = build_optimizer(module.parameters(), inner_cfg)
        head = find_lm_head(module)  # a tied head warns (TiedLmHeadWarning), once per weight
        return GatedOptimizer(inner, lm_head=head, config=cfg)

    @property
    def gated_optimizer(self) -> GatedOptimizer | None:
        """The :class:`~dgg_fused.GatedOptimizer` of this engine, or None (DGG not configured)."""
        return unwrap_gated(getattr(self, "optimizer", None))

    def optimizer_step(self) -> Any:
        gated = self.gated_optimizer
        if gated is not None and gated.config.reads_energy:
            scaler = getattr(self, "scaler", None)
            scale = scaler._scale if scaler is not None and scaler.is_enabled() else None  # device tensor, no sync
            gated.record_energy(grad_scale=scale)  # before verl unscales and clips
        if gated is not None and gated.config.takes_drift:
            if self.dgg_drift is None or self.dgg_drift.empty:
                raise RuntimeError(
                    "DGG: the gate watches a drift statistic but no micro-batch of this mini-batch had old_log_probs"
                )
            self.dgg_drift.record(gated, group=self.get_data_parallel_group())
        return super().optimizer_step()


class DGGTrainingWorker(TrainingWorker):
    """verl's ``TrainingWorker`` that tells the gate the reuse pass of every mini-batch and stops the update early
    once it tripped (see the module docstring)."""

    _dgg_loop: dict | None = None

    @property
    def gated_optimizer(self) -> GatedOptimizer | None:
        return unwrap_gated(getattr(self.engine, "optimizer", None))

    def set_loss_fn(self, loss_fn: Any) -> None:
        """verl's ``set_loss_fn``, with the loss wrapped so that a drift gate gets its statistics (see
        :class:`_DriftProbe`)."""
        return super().set_loss_fn(_DriftProbe(self, loss_fn))

    def train_mini_batch(self, data: Any) -> Any:
        gated = self.gated_optimizer
        if gated is None:
            return super().train_mini_batch(data)
        n = data.shape[0]
        mbs = tu.get(data, key="mini_batch_size", default=None)
        num_mb = tu.get(data, key="num_mini_batch", default=None)
        epochs = int(tu.get(data, key="epochs", default=1))
        per_gpu = n // num_mb if mbs is None else mbs // self.engine.get_data_parallel_size()
        per_pass = n // per_gpu
        if epochs > gated.config.max_reuse:
            raise ValueError(
                f"ppo_epochs={epochs} exceeds the gate's max_reuse={gated.config.max_reuse}; set "
                f"optim.override_optimizer_config.dgg.max_reuse >= {epochs}"
            )
        self._dgg_loop = {"per_pass": per_pass, "i": 0, "skipped": 0, "passes": 0}
        gated.set_reuse_index(1)
        try:
            output = super().train_mini_batch(data)
        finally:
            loop, self._dgg_loop = self._dgg_loop, None
        if output is not None:
            metrics = tu.get(output, "metrics")
            extra = gate_metrics(gated)
            extra.update({"dgg/skipped_mini_batches": loop["skipped"], "dgg/passes_run": loop["passes"]})
            metrics.update({key: [value] for key, value in extra.items()})  # verl's metrics are lists it reduces
        return output

    def train_batch(self, data: Any) -> Any:
        loop = self._dgg_loop
        if loop is None:  # called directly (not from train_mini_batch): verl's behaviour
            return super().train_batch(data)
        gated = self.gated_optimizer
        k = loop["i"] // loop["per_pass"] + 1
        loop["i"] += 1
        # every rank holds the same all-reduced decision, so every rank skips the same mini-batches
        if k > 1 and gated.poll_reuse_stopped(block=True):
            loop["skipped"] += 1
            if tu.get(data, key="update_lr_scheduler", default=False):
                self.engine.lr_scheduler_step()  # the schedule advances once per update, as without the skip
            if self.engine.is_mp_src_rank_with_outputs():
                return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": {}})
            return None
        if k != gated.reuse_index:
            gated.set_reuse_index(k)
        loop["passes"] = max(loop["passes"], k)
        return super().train_batch(data)


class _DriftProbe:
    """The worker's loss function, plus: when the gate watches a drift statistic (``GateConfig.drift``), each
    micro-batch's drift of the current log-probabilities from ``old_log_probs`` (the rollout policy's, which verl's
    PPO loss reads too) over ``response_mask`` is added to the engine's sums for the next optimizer step."""

    def __init__(self, worker: "DGGTrainingWorker", fn: Any) -> None:
        self.worker, self.fn = worker, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        gated = self.worker.gated_optimizer
        model_output, data = kwargs.get("model_output"), kwargs.get("data")
        if gated is None or not gated.config.takes_drift or model_output is None or data is None:
            return out
        if not torch.is_grad_enabled():  # a forward-only pass (log-prob computation): no optimizer step follows
            return out
        if "old_log_probs" not in data.keys() or "log_probs" not in model_output:
            return out
        from verl.workers.utils.padding import no_padding_2_padding

        log_probs = no_padding_2_padding(model_output["log_probs"], data)
        padded = data.select("response_mask", "old_log_probs").to_padded_tensor()
        engine = self.worker.engine
        if engine.dgg_drift is None:
            engine.dgg_drift = DriftAccumulator()
        engine.dgg_drift.add(log_probs.detach(), padded["old_log_probs"], padded["response_mask"])
        return out


def _keep_dispatch(cls: type, base: type, names: tuple[str, ...]) -> None:
    # verl finds a worker's remote methods by the attribute its @register decorator sets; an override must carry it
    from verl.single_controller.base.decorator import MAGIC_ATTR

    for name in names:
        attrs = getattr(getattr(base, name), MAGIC_ATTR, None)
        if attrs is not None:
            setattr(getattr(cls, name), MAGIC_ATTR, attrs)


_keep_dispatch(DGGTrainingWorker, TrainingWorker, ("train_mini_batch", "train_batch", "set_loss_fn"))


def register() -> None:
    """Make verl build :class:`DGGFSDPEngine` for ``language_model`` / ``fsdp`` / ``fsdp2`` on every device it has
    an engine for, and :class:`DGGTrainingWorker` as the actor's training worker. Idempotent; called on import."""
    engines = EngineRegistry._engines.setdefault("language_model", {})
    for backend in ("fsdp", "fsdp2"):
        registry = engines.setdefault(backend, {})
        for key, cls in list(registry.items()):
            if cls is FSDPEngineWithLMHead:
                registry[key] = DGGFSDPEngine
    if ActorRolloutRefWorker.actor_worker_cls is TrainingWorker:
        ActorRolloutRefWorker.actor_worker_cls = DGGTrainingWorker


def register_device(device: str) -> None:
    """Also register :class:`DGGFSDPEngine` for ``device`` (e.g. a CPU platform a test defines)."""
    for backend in ("fsdp", "fsdp2"):
        EngineRegistry._engines.setdefault("language_model", {}).setdefault(backend, {})[device] = DGGFSDPEngine


register()
