"""DeepSpeed ZeRO-1/2/3: the gate as DeepSpeed's client optimizer (and, through accelerate, under TRL).

    from dgg_fused.integrations.deepspeed import DeepSpeedGatedOptimizer
    opt = DeepSpeedGatedOptimizer(torch.optim.AdamW(param_groups, lr=1e-6, fused=True), lm_head=model.lm_head)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)  # zero_allow_untested_optimizer
    opt.attach(engine)
    for batch in rollout_batches:
        for k in opt.passes():
            for micro in split(batch):
                engine.backward(loss_fn(engine, micro))
                engine.step()               # one gate decision per accumulation boundary

What DeepSpeed does to a client optimizer, and how the gate copes (deepspeed 0.19):

* **No lm_head gradient.** After ``deepspeed.initialize`` the client optimizer holds flat fp32 partitions and
  ``lm_head.weight.grad`` is None. The energy is taken from each rank's *local* gradient fragments of the lm_head
  parameters (ZeRO-1/2: ``param._hp_mapping.get_lp_grad_fragment``; ZeRO-3: ``safe_get_local_grad``), summed in
  float64 and all-reduced (SUM) over the data-parallel group: one scalar collective that *every* rank joins,
  whether it owns a piece of the lm_head or not (a rank owning none contributes 0; a rank skipping the collective
  would deadlock the others). The full lm_head gradient is never gathered.
* **Before clipping, at the accumulation boundary.** :meth:`DeepSpeedGatedOptimizer.attach` wraps the ZeRO
  optimizer's ``step`` (called by ``engine.step()`` only at the boundary): the energy is measured there, after
  the gradients were reduced and before ZeRO unscales and clips them. Under fp16 the gradients are still scaled
  by the loss scale: the energy is divided by ``loss_scale**2``, and a non-finite energy there is an overflow
  (ZeRO drops that step itself; the gate ignores it, as it ignores a GradScaler overflow).
* **One decision per engine step**, on the public seam. ZeRO calls the client ``step()`` once per parameter group
  (ZeRO-1/2) or per sub-group (ZeRO-3, ``sub_group_size``). The gate decides once, before the first call
  (:meth:`~dgg_fused.GatedOptimizer.decide_` with the ZeRO energy, inside the optimizer's step hooks), and every
  client call of that engine step applies the same decision (:meth:`~dgg_fused.GatedOptimizer.apply_`): through
  torch's ``found_inf`` protocol for fused Adam/AdamW/SGD/Adagrad (exact skip on the device, the inner ``step``
  counters restored). Counted once: ``steps`` grows by one per engine step. Inner optimizers without the protocol
  (DeepSpeed's own FusedAdam / DeepSpeedCPUAdam) take the host path: the decision is read once per engine step on
  reuse passes and the client calls of a dropped step do nothing.
* **Checkpoints.** ``engine.save_checkpoint`` stores the client's ``state_dict()`` (with the gate under ``"dgg"``);
  ``engine.load_checkpoint`` hands it back to :meth:`load_state_dict`.
* **DeepSpeed config.** ``"zero_allow_untested_optimizer": true`` (DeepSpeed does not know the wrapper). Leave out
  the ``"optimizer"`` section (it would replace the client optimizer).

Through accelerate (``Accelerator(deepspeed_plugin=...)``, ``accelerate launch --use_deepspeed``, or the HF
``Trainer``'s ``deepspeed=`` argument) ``accelerator.backward`` runs ``engine.backward`` and ``engine.step`` back to
back; :class:`~dgg_fused.integrations.trl.DGGGRPOTrainer` builds a :class:`DeepSpeedGatedOptimizer` and attaches it
itself when DeepSpeed is enabled. OpenRLHF takes its optimizer from DeepSpeed the same way and is reached through
this mode (not tested here: it does not install without a CUDA toolchain).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..config import GateConfig
from ..distributed import global_sumsq
from ..optimizer import GatedOptimizer, StepDecision

__all__ = ["DeepSpeedGatedOptimizer", "zero_lm_head_energy", "local_grad_fragments"]


def local_grad_fragments(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's pieces of the gradients of ``params`` between ``engine.backward`` and the ZeRO step."""
    out: list[torch.Tensor] = []
    for p in params:
        if hasattr(p, "ds_id"):  # ZeRO-3: every rank holds a (possibly padded-empty) partition
            from deepspeed.utils import safe_get_local_grad

            g = safe_get_local_grad(p)
        else:  # ZeRO-1/2: only the ranks whose partition overlaps p have a mapping
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue
            g = mapping.get_lp_grad_fragment(p._index_in_param_group)
        if g is not None and g.numel() > 0:
            out.append(g)
    return out


def zero_lm_head_energy(params: list[torch.Tensor], group: Any = None, device: torch.device | None = None,
                        backend: str = "auto") -> torch.Tensor:
    """Global sum of squares of the ZeRO-partitioned gradients of ``params``: 0-d float32, no host sync.

    The local fragments' sum of squares (float64; none: 0) is all-reduced (SUM) over ``group`` (the data-parallel
    group) by :func:`dgg_fused.distributed.global_sumsq`. Every rank of ``group`` must call it, at the same point (it
    is one collective), owning a fragment or not.
    """
    frags = local_grad_fragments(params)
    dev = device if device is not None else params[0].device
    return global_sumsq(frags, groups=(group,), device=dev, backend=backend).to(torch.float32)


class DeepSpeedGatedOptimizer(GatedOptimizer):
    """A :class:`~dgg_fused.GatedOptimizer` to hand to ``deepspeed.initialize`` as the client optimizer.

    Build it *before* ``deepspeed.initialize`` (from the model's parameters, with the lm_head among them), then
    call :meth:`attach` with the engine. A drift gate (``GateConfig(drift=...)``) takes its statistics from
    :meth:`record_drift` before ``engine.step()``, as without DeepSpeed; they must be the same on every rank
    (reduce them over the data-parallel group first). Same arguments as :class:`~dgg_fused.GatedOptimizer` except
    ``max_grad_norm`` (DeepSpeed clips: set ``"gradient_clipping"`` in its config).

    Per-group / per-sub-group client calls inside one engine step share one decision (see the module docstring).
    Outside an attached engine step (not attached, or a direct call) ``step()`` is the plain gated step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lm_head: Any = None, config: GateConfig | None = None, *,
                 skip_mode: str = "auto", backend: str = "auto") -> None:
        super().__init__(optimizer, lm_head=lm_head, config=config, skip_mode=skip_mode, backend=backend)
        self._ds_zero: Any = None
        self._ds_decision: StepDecision | None = None  # the decision of the engine step in progress

    # ------------------------------------------------------------------ wiring
    def attach(self, engine: Any) -> "DeepSpeedGatedOptimizer":
        """Hook the gate into ``engine``'s ZeRO optimizer (the one ``deepspeed.initialize`` built around us).

        Raises ``ValueError`` when the engine does not use this object as its client optimizer, is not a ZeRO
        engine (stages 1-3), or writes elastic checkpoints (which would drop the gate's state).
        """
        zero = getattr(engine, "optimizer", engine)
        if getattr(zero, "optimizer", None) is not self:
            raise ValueError(
                "attach(engine): the engine's optimizer does not wrap this DeepSpeedGatedOptimizer; pass it as "
                "deepspeed.initialize(..., optimizer=opt) and leave the 'optimizer' section out of the DeepSpeed config"
            )
        stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
        if stage is not None and stage not in (1, 2, 3):
            raise ValueError(f"the DeepSpeed mode needs ZeRO stage 1, 2 or 3, the engine runs stage {stage}")
        if getattr(zero, "elastic_checkpoint", False):
            raise ValueError(
                "zero_optimization.elastic_checkpoint=true saves the client optimizer's state per parameter group and "
                "drops the rest of its state_dict, i.e. the gate's state; set it to false"
            )
        if self._ds_zero is zero:
            return self
        if self._ds_zero is not None:
            raise ValueError("this DeepSpeedGatedOptimizer is already attached to another engine")
        orig_step: Callable[..., Any] = zero.step

        def step(*args: Any, **kwargs: Any) -> Any:
            self._ds_decide(zero)
            try:
                return orig_step(*args, **kwargs)
            finally:
                self._ds_decision = None

        zero.step = step  # instance attribute: this engine's ZeRO optimizer only
        self._ds_zero = zero
        return self

    def _ds_energy(self, zero: Any) -> torch.Tensor | None:
        if not self.config.energy:  # a drift-only gate reads no gradient
            return None
        group = getattr(zero, "dp_process_group", None)
        e = zero_lm_head_energy(list(self.lm_head_params), group=group, backend=self.backend)
        scale = float(getattr(zero, "loss_scale", 1.0) or 1.0)  # a Python float in DeepSpeed (no sync)
        if scale != 1.0:
            e = e / (scale * scale)
        return e

    def _ds_decide(self, zero: Any) -> None:
        """One gate decision for the engine step about to run (measured before ZeRO unscales / clips), inside this
        optimizer's step hooks (once per engine step)."""
        energy = self._ds_energy(zero)
        overflow = None
        fp16_checks = getattr(zero, "check_grad_overflow", False) or getattr(zero, "dynamic_loss_scale", False)
        if energy is not None and fp16_checks:
            overflow = (~torch.isfinite(energy)).to(torch.float32)  # ZeRO drops this step itself: not a trip
        with self.step_hooks():
            self._ds_decision = self.decide_(energy=energy, external_skip=overflow)  # no parameter is touched

    # ------------------------------------------------------------------ the client step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Inside an attached engine step: the inner step of one parameter group / sub-group under the engine
        step's decision (:meth:`apply_`). Otherwise: :meth:`GatedOptimizer.step`."""
        decision = self._ds_decision
        if decision is None:
            return super().step(closure)
        if closure is not None:
            raise ValueError("DeepSpeedGatedOptimizer.step: DeepSpeed does not pass a closure")
        self.apply_(decision)
        return None


DeepSpeedGatedOptimizer.step.hooked = True  # type: ignore[attr-defined]  # as GatedOptimizer.step
