"""TRL ``GRPOTrainer`` with rollout reuse under DGG: the one-line change is the class name.

    from dgg_fused.integrations.trl import DGGGRPOTrainer      # instead of: from trl import GRPOTrainer
    trainer = DGGGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(num_iterations=4, ...), ...)

Supported: trl >= 1.16, < 2 (tested with 1.16.0; the ``trl`` extra of pyproject pins that range). What it changes
in TRL's loop (trl 1.16 names):

* **Reuse index.** TRL replays ``self._buffered_inputs`` for ``num_iterations`` (= K) passes of
  ``steps_per_generation`` micro-steps each. Before every micro-step the trainer tells the gate which pass it is
  on: ``k = (micro_steps since the buffer was generated) // steps_per_generation + 1``.
* **Regenerate on a trip.** When the gate trips, the buffer is dropped and the next micro-step generates fresh
  rollouts (from the prompts the dataloader hands that micro-step: TRL's ``RepeatSampler`` repeats one prompt set
  ``K * steps_per_generation`` times, so this is a fresh group of completions for the current prompts, scored by
  the current policy). The new buffer gets its own K passes; TRL's fixed regeneration schedule
  (``_step % (steps_per_generation * K) == 0``) is replaced by this per-buffer count. Every prompt set the sampler
  yields still gets at least one generation, since a buffer never lives longer than TRL's cycle.
  The decision is read with ``poll_reuse_stopped(block=True)``: every rank sees the same, current answer (the
  gate's energy is all-reduced, see :mod:`dgg_fused.distributed`), so all ranks regenerate together.
* **Energy before clipping.** ``Trainer._clip_grad_norm`` is where the Trainer clips (``max_grad_norm`` > 0,
  default 1.0). The trainer records the lm_head energy right before it (``GatedOptimizer.record_energy``), after
  gradient accumulation and after DDP / FSDP2 have reduced the gradients, so the gate sees the unclipped energy of
  the whole optimizer step, identical on every rank. (A post-accumulate-grad hook would see DDP gradients before
  their all-reduce, i.e. a different energy per rank, so it is not used.) With fp16 + a GradScaler the
  gradients are still scaled there; the energy is divided by the scale. With ``max_grad_norm=0`` the energy is
  measured in ``optimizer.step()``.
* **Scheduler on skipped steps: the schedule advances.** A gated step is still an optimizer step of the Trainer:
  ``global_step`` advances, the LR scheduler steps (accelerate only holds it on a GradScaler overflow), and
  ``max_steps`` counts it. The LR is therefore a function of ``global_step`` alone, identical on every rank and on
  resume. The inner optimizer's own step counter (Adam's bias correction) does *not* advance on a gated step
  (the skip is exact). If you want the schedule to ignore gated steps, use a longer ``max_steps``.
* **Metrics.** A :class:`~dgg_fused.integrations.hf.DGGMetricsCallback` is registered first, so ``dgg/*`` gate
  metrics land in the trainer's logs (and wandb/tensorboard when configured).

The optimizer the Trainer builds (``args.optim``; TRL's default is torch's fused AdamW, the sync-free path) is
wrapped in a :class:`~dgg_fused.GatedOptimizer` in ``create_optimizer``; pass ``optimizers=(GatedOptimizer(...),
scheduler)`` to bring your own. ``lm_head=None`` finds the output projection with :func:`dgg_fused.find_lm_head`.
"""

from __future__ import annotations

from typing import Any

try:
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("dgg_fused.integrations.trl needs TRL: pip install 'dgg_fused[trl]' (trl>=1.16,<2)") from exc

from ..config import GateConfig
from ..lm_head import find_lm_head
from ..optimizer import GatedOptimizer
from . import unwrap_gated
from .hf import DGGMetricsCallback, add_metrics_callback

__all__ = ["DGGGRPOTrainer", "DGGMetricsCallback", "SUPPORTED_TRL"]

#: The TRL versions this integration is written against (it relies on ``_prepare_inputs``, ``_step``,
#: ``_buffered_inputs`` and ``Trainer._clip_grad_norm``).
SUPPORTED_TRL = ">=1.16,<2"


class DGGGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose rollout reuse (``num_iterations`` = K) is gated by DGG.

    Args (in addition to GRPOTrainer's):
        dgg_config: the :class:`~dgg_fused.GateConfig`; default ``GateConfig(max_reuse=num_iterations)``. Its
            ``max_reuse`` must be >= ``num_iterations``.
        lm_head: the output projection (module, Parameter or iterable of Parameters); default: found with
            :func:`dgg_fused.find_lm_head` on the model.
        skip_mode: passed to :class:`~dgg_fused.GatedOptimizer`.
        log_gate_metrics: register :class:`~dgg_fused.integrations.hf.DGGMetricsCallback` (default True).
    """

    def __init__(
        self,
        *args: Any,
        dgg_config: GateConfig | None = None,
        lm_head: Any = None,
        skip_mode: str = "auto",
        log_gate_metrics: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        k = int(self.num_iterations)
        if dgg_config is None:
            dgg_config = GateConfig(max_reuse=max(k, 1))
        if not isinstance(dgg_config, GateConfig):
            raise TypeError(f"dgg_config must be a GateConfig, got {type(dgg_config).__name__}")
        if dgg_config.max_reuse < k:
            raise ValueError(
                f"dgg_config.max_reuse={dgg_config.max_reuse} is smaller than num_iterations={k}; "
                "the gate must accept every reuse pass TRL runs"
            )
        self.dgg_config = dgg_config
        self._dgg_lm_head = lm_head
        self._dgg_skip_mode = skip_mode
        self._dgg_gen_step = 0  # value of self._step when the current buffer was generated
        self.dgg_generations: list[int] = []  # global_step at each (re)generation, for inspection
        if log_gate_metrics:
            add_metrics_callback(self)

    # ------------------------------------------------------------------ optimizer
    @property
    def gated_optimizer(self) -> GatedOptimizer | None:
        """The :class:`~dgg_fused.GatedOptimizer` behind ``self.optimizer`` (accelerate hides it), or None."""
        return unwrap_gated(self.optimizer)

    def create_optimizer(self, model: Any = None) -> Any:
        super().create_optimizer(model)
        if unwrap_gated(self.optimizer) is None:
            target = self.model if model is None else model
            head = self._dgg_lm_head
            if head is None:
                head = find_lm_head(self.accelerator.unwrap_model(target), warn_tied=True)
            self.optimizer = GatedOptimizer(
                self.optimizer, lm_head=head, config=self.dgg_config, skip_mode=self._dgg_skip_mode
            )
        return self.optimizer

    def _clip_grad_norm(self, model: Any) -> Any:
        gated = self.gated_optimizer
        if gated is not None:
            gated.record_energy(grad_scale=self._dgg_grad_scale())
        return super()._clip_grad_norm(model)

    def _dgg_grad_scale(self) -> Any:
        """The GradScaler's scale while the gradients are still scaled (fp16 via accelerate), else None."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        # accelerate unscales inside clip_grad_norm_, i.e. after this point: the gradients are still scaled.
        return scaler._scale  # the device tensor; get_scale() would sync

    # ------------------------------------------------------------------ rollout reuse
    def _dgg_pass(self) -> int:
        return (self._step - self._dgg_gen_step) // self.args.steps_per_generation + 1

    def _prepare_inputs(self, generation_batch: Any) -> Any:
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        gated = self.gated_optimizer
        spg, k_max = self.args.steps_per_generation, self.num_iterations
        regenerate = self._buffered_inputs is None or self._step - self._dgg_gen_step >= spg * k_max
        if gated is not None and not regenerate and gated.poll_reuse_stopped(block=True):
            regenerate = True  # the gate tripped on this buffer: fresh rollouts instead of replaying it
        if regenerate:
            self._buffered_inputs = None
            self._dgg_gen_step = self._step
            self.dgg_generations.append(self.state.global_step)
        if gated is not None:
            gated.set_reuse_index(self._dgg_pass())
        # TRL's _prepare_inputs regenerates when `_step % (spg * K) == 0 or _buffered_inputs is None` and returns
        # `_buffered_inputs[_step % spg]`: hand it the micro-step offset within the current buffer instead.
        real_step = self._step
        self._step = real_step - self._dgg_gen_step
        try:
            return super()._prepare_inputs(generation_batch)
        finally:
            self._step = real_step
