"""TRL ``GRPOTrainer`` with rollout reuse under DGG: the one-line change is the class name.

    from dgg_fused.integrations.trl import DGGGRPOTrainer      # instead of: from trl import GRPOTrainer
    trainer = DGGGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(num_iterations=4, ...), ...)

or, to configure the gate from the command line / a YAML file, :class:`DGGGRPOConfig` (a ``GRPOConfig`` with
``dgg_*`` fields that ``trl.TrlParser`` reads)::

    args = TrlParser((DGGGRPOConfig,)).parse_args_and_config()[0]   # --num_iterations 4 --dgg_tau 0.3 ...
                                                                    # --dgg_preset recommended (the KL early stop)

Supported: trl >= 1.16, < 2. In TRL's loop the trainer tells the gate the reuse pass ``k`` of every micro-step
(:meth:`~dgg_fused.GatedOptimizer.set_reuse_index`), regenerates rollouts at the next micro-step after a trip
(:meth:`~dgg_fused.GatedOptimizer.poll_reuse_stopped`, the same answer on every rank), records the lm_head energy
right before the Trainer clips (:meth:`~dgg_fused.GatedOptimizer.record_energy`), and hands a drift gate the
statistics of each optimizer step (:meth:`~dgg_fused.GatedOptimizer.record_drift`); under DeepSpeed ZeRO it builds
and attaches a :class:`~dgg_fused.integrations.deepspeed.DeepSpeedGatedOptimizer`. Settings under which the gate
could never act, or would act on mixed passes, raise ``ValueError`` at construction. What it changes in TRL's loop,
what it refuses and why, PEFT and tied heads: docs/integrations.md, "TRL GRPOTrainer".
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

try:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("dgg_fused.integrations.trl needs TRL: pip install 'dgg_fused[trl]' (trl>=1.16,<2)") from exc

import torch

from ..callsite import user_stacklevel
from ..checkpoint import STATE_KEY, WindowMismatch
from ..config import GateConfig
from ..lm_head import check_tied
from ..optimizer import SKIP_MODES, GatedOptimizer
from . import DriftAccumulator, unwrap_gated
from .hf import DGGMetricsCallback, add_metrics_callback, resolve_lm_head, warmup_optimizer_steps

__all__ = ["DGGGRPOTrainer", "DGGGRPOConfig", "DGGMetricsCallback", "SUPPORTED_TRL"]

#: The TRL versions this integration is written against (it relies on ``_prepare_inputs``, ``_step``,
#: ``_buffered_inputs`` and ``Trainer._clip_grad_norm``).
SUPPORTED_TRL = ">=1.16,<2"

_GATE_DEFAULTS = {f.name: f.default for f in fields(GateConfig)}
#: The named gates ``--dgg_preset`` selects: :meth:`GateConfig.paper` and :meth:`GateConfig.recommended`.
PRESETS = ("paper", "recommended")
#: What ``--dgg_drift`` takes for "no drift statistic" (a YAML ``dgg_drift: approx_kl`` can be switched off).
_NONE_WORDS = ("none", "None", "null", "")


def _gate_field(name: str, help: str) -> Any:
    return field(default=_GATE_DEFAULTS[name], metadata={"help": help})


@dataclass
class DGGGRPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the gate's settings, so ``TrlParser`` (CLI flags, YAML) can set them.

    Each ``dgg_<name>`` field is :class:`~dgg_fused.GateConfig`'s ``<name>`` (same default, same validation, done
    at construction); ``dgg_max_reuse`` defaults to ``num_iterations``. ``dgg_preset`` starts from a named gate
    (``paper`` = ``GateConfig.paper()``, ``recommended`` = ``GateConfig.recommended()``, PPO's target-KL early stop)
    that the other ``dgg_*`` fields given then adjust. :meth:`gate_config` builds the ``GateConfig``. Command line:
    ``--num_iterations 4 --dgg_tau 0.3 --dgg_window 8`` or ``--dgg_preset recommended``; YAML: ``dgg_tau: 0.3``.
    ``--dgg_drift none`` switches a drift statistic off.

    A field counts as *set* (:meth:`gate_settings`) when it differs from its default, or for every field of a
    ``dgg_preset``: only set fields can conflict with a ``GateConfig`` passed to the trainer as ``dgg_config=``.
    """

    dgg_preset: str | None = field(
        default=None,
        metadata={"help": "DGG: start from a named gate: paper (the lm_head-energy Z-score, GateConfig.paper()) or "
                          "recommended (PPO's target-KL early stop, GateConfig.recommended()); the other dgg_* flags "
                          "given adjust it.", "choices": [*PRESETS, None]},
    )

    dgg_window: int = _gate_field("window", "DGG: reference observations in the gate's sliding window.")
    dgg_tau: float = _gate_field("tau", "DGG: Z-score threshold above which a reuse-pass step is dropped.")
    dgg_max_reuse: int | None = field(
        default=None, metadata={"help": "DGG: maximum reuse passes K the gate accepts (default: num_iterations)."}
    )
    dgg_statistic: str = _gate_field("statistic", "DGG: what the Z-score is taken of: energy, increment or both.")
    dgg_reference: str = _gate_field("reference", "DGG: which steps feed the window: first_pass, accepted, all.")
    dgg_std_floor: float = _gate_field("std_floor", "DGG: relative floor on the window's standard deviation.")
    dgg_energy: bool = _gate_field("energy", "DGG: watch the lm_head gradient energy (the paper's rule).")
    dgg_drift: str | None = field(
        default=None,
        metadata={"help": "DGG: a policy-drift statistic to watch: approx_kl, clip_frac, ratio_max, ess, log_ratio_m2 "
                          "or tv (default none)."},
    )
    dgg_drift_rule: str = _gate_field("drift_rule", "DGG: how the drift statistic trips: threshold or zscore.")
    dgg_drift_threshold: float = _gate_field("drift_threshold", "DGG: threshold of the drift rule (e.g. target KL).")
    dgg_drift_direction: str = _gate_field(
        "drift_direction", "DGG: which side of the drift threshold trips: auto (the statistic's harm direction: "
                           "below for ess, above otherwise), above or below.")
    dgg_combine: str = _gate_field("combine", "DGG: energy and drift rules combined: any (either trips) or all.")
    dgg_action: str = _gate_field("action", "DGG: what a trip does: skip (drop the step, stop reuse), scale (shrink the step, "
                                  "keep reusing) or watch (record only).")
    dgg_skip_mode: str = field(
        default="auto", metadata={"help": f"DGG: how a step is dropped, one of {SKIP_MODES}."}
    )
    dgg_lm_head: str | None = field(
        default=None,
        metadata={"help": "DGG: dotted name of the output projection module (default: found automatically)."},
    )
    dgg_warn_tied: bool = field(
        default=True, metadata={"help": "DGG: warn when the lm_head is tied to the input embedding."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dgg_skip_mode not in SKIP_MODES:
            raise ValueError(f"DGGGRPOConfig.dgg_skip_mode must be one of {SKIP_MODES}, got {self.dgg_skip_mode!r}")
        if self.dgg_preset not in (*PRESETS, None):
            raise ValueError(f"DGGGRPOConfig.dgg_preset must be one of {PRESETS} or None, got {self.dgg_preset!r}")
        if self.dgg_drift in _NONE_WORDS:
            self.dgg_drift = None
        try:
            self.gate_config()
        except ValueError as exc:
            raise ValueError(f"DGGGRPOConfig (the dgg_* fields): {exc}") from None

    def _given(self) -> dict[str, Any]:
        """The ``GateConfig`` fields given a value other than their default (``dgg_max_reuse``: not None)."""
        given = {}
        for name, default in _GATE_DEFAULTS.items():
            value = getattr(self, f"dgg_{name}")
            if value != (None if name == "max_reuse" else default):
                given[name] = value
        return given

    def gate_config(self) -> GateConfig:
        """The :class:`~dgg_fused.GateConfig` these fields describe: the ``dgg_preset`` (default: the paper's rule)
        with the fields given, ``max_reuse`` defaulting to ``num_iterations``."""
        kw = {"max_reuse": max(int(self.num_iterations), 1), **self._given()}
        return getattr(GateConfig, self.dgg_preset or "paper")(**kw)

    def gate_settings(self) -> dict[str, Any]:
        """The ``GateConfig`` fields these ``dgg_*`` fields set, with their values: the fields given, and with a
        ``dgg_preset`` every field but a ``max_reuse`` left to ``num_iterations``. Empty: nothing was set."""
        given = self._given()
        if self.dgg_preset is None:
            return given
        cfg = self.gate_config()
        return {n: getattr(cfg, n) for n in _GATE_DEFAULTS if n != "max_reuse" or n in given}


class DGGGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose rollout reuse (``num_iterations`` = K) is gated by DGG.

    Args (in addition to GRPOTrainer's):
        dgg_config: the :class:`~dgg_fused.GateConfig` (e.g. ``GateConfig.recommended()``); default:
            ``args.gate_config()`` for a :class:`DGGGRPOConfig`, else ``GateConfig(max_reuse=num_iterations)``. Its
            ``max_reuse`` must be >= ``num_iterations``. With a :class:`DGGGRPOConfig` too, the ``dgg_*`` fields the
            user set (:meth:`DGGGRPOConfig.gate_settings`) must agree with it; unset ones are not settings.
        lm_head: what the gate watches: ``None`` (the output projection, found automatically; under PEFT its
            trainable copy or adapters), a dotted module name looked up on the model *after* PEFT wrapped it
            (``"lm_head"``; use this with ``peft_config=``), a module, a Parameter or an iterable of Parameters.
            Default: ``args.dgg_lm_head`` for a :class:`DGGGRPOConfig`.
        skip_mode: passed to :class:`~dgg_fused.GatedOptimizer` (default ``args.dgg_skip_mode`` or ``"auto"``).
        warn_tied: warn (:class:`~dgg_fused.TiedLmHeadWarning`) when the lm_head is tied to the input embedding
            (default ``args.dgg_warn_tied`` or True).
        log_gate_metrics: register :class:`~dgg_fused.integrations.hf.DGGMetricsCallback` (default True).

    Raises:
        ValueError: at construction, for every setting under which the gate could never act or would act on
            mixed passes (see the module docstring).
    """

    def __init__(
        self,
        *args: Any,
        dgg_config: GateConfig | None = None,
        lm_head: Any = None,
        skip_mode: str | None = None,
        warn_tied: bool | None = None,
        log_gate_metrics: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        targs = self.args
        from_args = isinstance(targs, DGGGRPOConfig)
        k = int(self.num_iterations)
        user_gated = unwrap_gated(self.optimizer)  # a GatedOptimizer passed through optimizers=
        if dgg_config is not None and not isinstance(dgg_config, GateConfig):
            raise TypeError(f"dgg_config must be a GateConfig, got {type(dgg_config).__name__}")
        # Every place that configures the gate, with the fields it sets: a GateConfig sets all of them, the dgg_*
        # fields only those given (or a preset's). Two places conflict only on a field both set differently.
        sources: dict[str, tuple[GateConfig, dict[str, Any]]] = {}
        if user_gated is not None:
            cfg = user_gated.config
            sources["the GatedOptimizer passed through optimizers= (its config=)"] = (cfg, cfg.to_dict())
        if dgg_config is not None:
            sources["dgg_config="] = (dgg_config, dgg_config.to_dict())
        settings = targs.gate_settings() if from_args else {}
        if settings:
            sources["the DGGGRPOConfig's dgg_* fields"] = (targs.gate_config(), settings)
        named = list(sources.items())
        clash = sorted({n for i, (_, (_, a)) in enumerate(named) for _, (_, b) in named[i + 1:]
                        for n in a.keys() & b.keys() if a[n] != b[n]})
        if clash:
            listed = "; ".join(f"{name}: {', '.join(f'{n}={fs[n]!r}' for n in clash if n in fs)}"
                               for name, (_, fs) in named)
            raise ValueError(
                f"the gate is configured in {len(sources)} places with different settings ({listed}); "
                "configure it in one place (the others would be ignored)"
            )
        if sources:
            cfg = next(iter(sources.values()))[0]
        else:
            cfg = targs.gate_config() if from_args else GateConfig(max_reuse=max(k, 1))
        if k <= 1:
            raise ValueError(
                f"num_iterations={k}: there is no reuse pass, so the gate can never act (DGG only drops steps on "
                "passes k > 1). Set GRPOConfig(num_iterations=K) with K > 1 (the paper uses 4), or use "
                "trl.GRPOTrainer."
            )
        if cfg.max_reuse < k:
            raise ValueError(
                f"the gate's max_reuse={cfg.max_reuse} is smaller than num_iterations={k}: training would fail at "
                f"pass {cfg.max_reuse + 1}. Use GateConfig(max_reuse={k}) (or larger)"
            )
        spg, gas = int(targs.steps_per_generation), int(targs.gradient_accumulation_steps)
        if spg % gas != 0:
            raise ValueError(
                f"steps_per_generation={spg} is not a multiple of gradient_accumulation_steps={gas}: an optimizer "
                "step would mix micro-batches of two reuse passes, so no step is a pure first pass and the gate "
                "never warms up. Use steps_per_generation = m * gradient_accumulation_steps (m >= 1; the default "
                "is m = 1)"
            )
        if user_gated is not None and self.is_deepspeed_enabled:
            from .deepspeed import DeepSpeedGatedOptimizer

            if not isinstance(user_gated, DeepSpeedGatedOptimizer):
                raise ValueError(
                    "under DeepSpeed pass a dgg_fused.integrations.deepspeed.DeepSpeedGatedOptimizer through "
                    "optimizers= (a plain GatedOptimizer cannot see ZeRO-partitioned gradients)"
                )
        if skip_mode is None:
            skip_mode = targs.dgg_skip_mode if from_args else "auto"
        if skip_mode not in SKIP_MODES:
            raise ValueError(f"skip_mode must be one of {SKIP_MODES}, got {skip_mode!r}")
        if lm_head is None and from_args:
            lm_head = targs.dgg_lm_head
        if warn_tied is None:
            warn_tied = targs.dgg_warn_tied if from_args else True
        self.dgg_config = cfg
        self._dgg_skip_mode = skip_mode
        self._dgg_lm_head: list | None = None
        if user_gated is None and cfg.reads_energy:
            # Resolved now, on the model as TRL left it (PEFT-wrapped when peft_config= was given), so that a frozen
            # head fails here and not at train().
            self._dgg_lm_head = resolve_lm_head(self.model, lm_head, warn_tied=warn_tied)
        elif user_gated is not None and lm_head is not None:
            raise ValueError("lm_head= is ignored when a GatedOptimizer is passed through optimizers= (it has its own)")
        elif lm_head is not None:
            raise ValueError("lm_head= is not used: this gate watches no lm_head energy (GateConfig.energy=False)")
        elif user_gated is not None and cfg.reads_energy:  # (TRL computes logits from lm_head.weight, not the module)
            check_tied(self.model, user_gated.lm_head_params, warn=warn_tied)
        self._dgg_gen_step = 0  # value of self._step when the current buffer was generated
        self._dgg_capture = False
        self._dgg_logps: torch.Tensor | None = None
        self._dgg_drift = DriftAccumulator()  # the drift statistics of the current optimizer step
        self.dgg_generations: list[int] = []  # global_step at each (re)generation, for inspection
        self.add_callback(_WarmupCheck(self))
        if log_gate_metrics:
            add_metrics_callback(self)

    # ------------------------------------------------------------------ optimizer
    @property
    def gated_optimizer(self) -> GatedOptimizer | None:
        """The :class:`~dgg_fused.GatedOptimizer` behind ``self.optimizer`` (accelerate hides it), or None."""
        return unwrap_gated(self.optimizer)

    def create_optimizer(self, model: Any = None) -> Any:
        super().create_optimizer(model)
        gated = unwrap_gated(self.optimizer)
        if gated is None:
            cls = GatedOptimizer
            if self.is_deepspeed_enabled:  # ZeRO: the client optimizer of the engine (attached in _prepare_inputs)
                from .deepspeed import DeepSpeedGatedOptimizer as cls  # noqa: N813
            self.optimizer = cls(
                self.optimizer, lm_head=self._dgg_lm_head, config=self.dgg_config, skip_mode=self._dgg_skip_mode
            )
        return self.optimizer

    def _load_optimizer_and_scheduler(self, checkpoint: Any) -> None:
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except WindowMismatch as exc:
            path = os.path.join(str(checkpoint), "optimizer.pt")
            raise ValueError(
                f"DGGGRPOTrainer: cannot resume the gate from {checkpoint}: it was saved with window {exc.saved}, this "
                f"run's gate has window {exc.current}. Resume it with --dgg_window {exc.saved} (DGGGRPOConfig("
                f"dgg_window={exc.saved}), or dgg_config=GateConfig(window={exc.saved}, ...)); or start the gate fresh "
                f"(the model and the inner optimizer still resume) by removing its '{STATE_KEY}' entry from the "
                f"checkpoint: sd = torch.load({path!r}, weights_only=True); del sd[{STATE_KEY!r}]; "
                f"torch.save(sd, {path!r})"
            ) from None

    def _dgg_attach_deepspeed(self, gated: GatedOptimizer) -> None:
        """Under DeepSpeed: hook the gate into the engine accelerate built (once, at the first training step)."""
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if wrapped is not None:
            gated.attach(wrapped.engine)

    def _clip_grad_norm(self, model: Any) -> Any:
        gated = self.gated_optimizer
        if gated is not None and gated.config.reads_energy and not self.is_deepspeed_enabled:
            gated.record_energy(grad_scale=self._dgg_grad_scale())  # (DeepSpeed: measured in the engine step)
        return super()._clip_grad_norm(model)

    def _dgg_grad_scale(self) -> Any:
        """The GradScaler's scale while the gradients are still scaled (fp16 via accelerate), else None."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        # accelerate unscales inside clip_grad_norm_, i.e. after this point: the gradients are still scaled.
        return scaler._scale  # the device tensor; get_scale() would sync

    # ------------------------------------------------------------------ drift signal
    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._dgg_capture:
            self._dgg_logps = out[0]
        return out

    def _compute_loss(self, model: Any, inputs: Any) -> Any:
        gated = self.gated_optimizer
        if gated is None or not gated.config.takes_drift or not self.model.training:
            return super()._compute_loss(model, inputs)
        self._dgg_capture, self._dgg_logps = True, None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._dgg_capture = False
        self._dgg_accumulate_drift(inputs)
        if self.accelerator.sync_gradients:  # the last micro-batch of this optimizer step (before backward: under
            self._dgg_record_drift(gated)  # DeepSpeed the engine steps inside accelerator.backward)
        return loss

    def _dgg_accumulate_drift(self, inputs: Any) -> None:
        """Add this micro-batch's drift (against the rollout policy's log-probs TRL kept) to the step's sums."""
        new = self._dgg_logps
        if new is None:
            raise RuntimeError("DGGGRPOTrainer: TRL's _compute_loss did not compute per-token log-probabilities")
        old = inputs.get("old_per_token_logps")
        old = new.detach() if old is None else old  # TRL omits them when they equal the current ones
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        self._dgg_drift.add(new, old, mask, clip_eps=float(self.epsilon_low))

    def _dgg_record_drift(self, gated: GatedOptimizer) -> None:
        """Token-weighted means over every micro-batch of the optimizer step and every rank (one SUM and one MAX
        all-reduce under multi-process training, on the device), handed to the gate before its step."""
        self._dgg_drift.record(gated)

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
            if self.is_deepspeed_enabled:
                self._dgg_attach_deepspeed(gated)
            gated.set_reuse_index(self._dgg_pass())
        # TRL's _prepare_inputs regenerates when `_step % (spg * K) == 0 or _buffered_inputs is None` and returns
        # `_buffered_inputs[_step % spg]`: hand it the micro-step offset within the current buffer instead.
        real_step = self._step
        self._step = real_step - self._dgg_gen_step
        try:
            return super()._prepare_inputs(generation_batch)
        finally:
            self._step = real_step


class _WarmupCheck(TrainerCallback):
    """Warns at the start of training when ``max_steps`` ends before the gate's window can fill, pointing at the
    user's ``trainer.train()`` and saying what would let the gate act."""

    def __init__(self, trainer: DGGGRPOTrainer) -> None:
        self._trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t = self._trainer
        gated = t.gated_optimizer
        if gated is None:
            return
        cfg, k, max_steps = gated.config, int(t.num_iterations), state.max_steps
        per_pass = int(args.steps_per_generation) // int(args.gradient_accumulation_steps)
        need = warmup_optimizer_steps(cfg, per_pass, k)
        if max_steps > need:
            return
        fits = [(w, n) for w in range(cfg.window - 1, 1, -1)
                if (n := warmup_optimizer_steps(dataclasses.replace(cfg, window=w), per_pass, k)) < max_steps]
        ways = [f"a smaller window, --dgg_window {fits[0][0]} (GateConfig(window={fits[0][0]})), can act from step "
                f"{fits[0][1]}"] if fits else []
        ways += [f"train longer: --max_steps {need + 1} or more",
                 "or gate on policy drift with a threshold, which needs no window: --dgg_preset recommended "
                 "(GateConfig.recommended(), PPO's target-KL early stop)"]
        warnings.warn(
            f"DGG: the gate can act only from optimizer step {need} on (its window of {cfg.window} reference "
            f"observations, reference={cfg.reference!r}, fills only then), but this run has max_steps={max_steps}: "
            f"the gate will never drop a step. To let it act: {'; '.join(ways)}. dgg/window_filled in the logs shows "
            "the warm-up.",
            stacklevel=user_stacklevel(),
        )
