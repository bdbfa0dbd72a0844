"""GatedOptimizer: Dynamic Gradient Gating around any ``torch.optim.Optimizer``.

This class is the Optimizer contract and the reuse bookkeeping; it asks the others (docs/design.md has the map):

* :mod:`dgg_fused.plan` — every choice of the step (kernels, gate implementation, skip path), made once here;
* :mod:`dgg_fused.energy` — the step's lm_head energy and the clip that shares its read;
* :mod:`dgg_fused.gate` — the rule, on a device-resident :class:`~dgg_fused.gate.GateState`;
* :mod:`dgg_fused.skip` — the exact-skip protocol (``found_inf`` on the device, or the host), and the inner step.

**The wrapper contract.** ``param_groups``, ``state`` and ``defaults`` are properties that always read the inner
optimizer's current objects, so LR schedulers keep reaching the inner optimizer even after ``inner.load_state_dict``
replaced its groups (accelerate does this round trip at ``prepare`` time). The gate's own state lives under the
``"dgg"`` key of :meth:`~GatedOptimizer.state_dict`.

**The seam for engines.** :meth:`~GatedOptimizer.step` is :meth:`~GatedOptimizer.decide_` (measure, clip, update
the gate: a :class:`~dgg_fused.skip.StepDecision`) then :meth:`~GatedOptimizer.apply_` (the inner step under it).
An engine that steps its client optimizer several times per training step (DeepSpeed ZeRO) decides once and
applies the decision to every call.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from . import checkpoint
from .config import DRIFT_STATS, GateConfig, is_int, is_real
from .energy import Energy, EnergyMeter
from .gate import GateState, gate_step_
from .lm_head import params_of, watch_tied
from .plan import SKIP_MODES, Plan, check_clip_backend, make_plan
from .skip import HOST_PATH_WARNING, StepDecision, apply_, decide, fused_sgd_unprimed

__all__ = ["GatedOptimizer", "SKIP_MODES", "StepDecision"]

_BASE_ATTRS: dict[str, Any] = {}


def _optimizer_base_attrs() -> dict[str, Any]:
    """What ``torch.optim.Optimizer.__init__`` sets on an instance of *this* torch besides ``param_groups``,
    ``state`` and ``defaults`` (its hook dicts and flags), read once from a throwaway optimizer instead of being
    written out by hand: the wrapper cannot call ``Optimizer.__init__`` itself, since those three attributes are
    the inner optimizer's (delegated properties) and ``__init__`` would overwrite them."""
    if not _BASE_ATTRS:

        class _Probe(torch.optim.Optimizer):
            def step(self, closure=None):  # pragma: no cover - never called
                return None

        probe = _Probe([torch.zeros(1, requires_grad=True)], {})
        _BASE_ATTRS.update({k: v for k, v in vars(probe).items() if k not in ("param_groups", "state", "defaults")})
    return _BASE_ATTRS


class _HostStopFlag:
    """A host copy of the gate's 0-d ``stopped`` flag, refreshed after each step without making the host wait.

    On CUDA: a non-blocking copy into pinned memory plus an event, polled with ``query()`` (never blocks unless
    asked); inside a CUDA-graph capture the copy is captured and lands at each replay, with no event. On CPU a plain
    copy (always current); on other accelerators a synchronising copy (no event API here).
    """

    def __init__(self, device: torch.device) -> None:
        pin = device.type == "cuda" and torch.cuda.is_available()
        self.buf = torch.zeros((), dtype=torch.bool, pin_memory=pin)
        self.event = None
        self.cached = False

    def clear(self) -> None:
        self.buf.fill_(False)
        self.event = None
        self.cached = False

    def publish(self, src: torch.Tensor) -> None:
        if src.device.type == "cuda":
            self.buf.copy_(src, non_blocking=True)
            if torch.cuda.is_current_stream_capturing():
                # An event recorded inside a capture cannot be queried afterwards; a late answer is safe (steps of
                # a stopped batch are dropped on the device anyway).
                self.event = None
            else:
                self.event = torch.cuda.Event()
                self.event.record()
        else:
            self.buf.copy_(src)

    def poll(self, block: bool) -> bool:
        ev = self.event
        if ev is not None:
            if block:
                ev.synchronize()
            elif not ev.query():
                return self.cached
            self.event = None
        self.cached = bool(self.buf)
        return self.cached

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "event": None}  # a CUDA event is not picklable; the buffer is re-read on demand


class GatedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that DGG can drop lm_head-energy spikes on reuse passes before they reach it.

    Example::

        opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True), lm_head=model.lm_head)
        for batch in rollout_batches:
            for k in opt.passes():              # k = 1..max_reuse, stops once the gate trips
                loss_fn(model, batch).backward()
                opt.step()
                opt.zero_grad()

    Args:
        optimizer: any ``torch.optim.Optimizer`` holding the lm_head parameters. ``fused=True`` Adam, AdamW, SGD
            and Adagrad take the sync-free path (README, "Exact skip, no host sync").
        lm_head: the output projection: an ``nn.Module``, a ``Parameter`` or an iterable of Parameters
            (:func:`dgg_fused.find_lm_head` finds it). None only when the gate reads no energy (``config.energy=False``
            with a drift statistic other than ``"energy_decay"``).
        config: a :class:`GateConfig` (default ``GateConfig()``, the paper's rule).
        skip_mode: one of :data:`SKIP_MODES`.
        backend: ``"auto"`` or a name of :data:`dgg_fused.ops.BACKENDS`: the kernels of the energy, of the gate
            update and of the clip.
        energy_group: process group of a hand-sharded (vocab-parallel) lm_head (:mod:`dgg_fused.distributed`).
        max_grad_norm: clip the total gradient norm (all parameters) to this value inside :meth:`step`, sharing
            the gate's read; the pre-clip norm is :attr:`grad_norm`.
        fold_clip: with ``max_grad_norm`` on the sync-free path, fold the clip coefficient into the fused kernel's
            ``grad_scale`` (one pass over the gradients less; equal to clipping up to rounding).
        energy_hook: measure the lm_head energy during backward (post-accumulate-grad hooks; on CUDA a side
            stream), used only when it is what the step would measure (docs/design.md).

    The plan of every step is resolved here (:attr:`plan`): an unknown ``backend`` or ``skip_mode`` raises
    ``ValueError``, an unavailable ``backend`` ``RuntimeError``, a bad ``lm_head`` ``TypeError`` / ``ValueError``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        lm_head: nn.Module | torch.Tensor | Iterable[torch.Tensor] | None,
        config: GateConfig | None = None,
        skip_mode: str = "auto",
        backend: str = "auto",
        max_grad_norm: float | None = None,
        energy_group: Any = None,
        fold_clip: bool = False,
        energy_hook: bool = False,
    ) -> None:
        if isinstance(optimizer, GatedOptimizer):
            raise TypeError("optimizer is already a GatedOptimizer; wrap the inner optimizer once")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("LBFGS re-evaluates its closure inside step(); DGG cannot gate it")
        if config is None:
            config = GateConfig()
        if not isinstance(config, GateConfig):
            raise TypeError(f"config must be a GateConfig, got {type(config).__name__}")
        params = _lm_head_params(lm_head, optimizer, config)
        if energy_group is not None:
            _check_group(energy_group)
        if not isinstance(energy_hook, bool):
            raise TypeError(f"energy_hook must be a bool, got {type(energy_hook).__name__}")
        if energy_hook and not params:
            raise ValueError("energy_hook=True measures the lm_head energy: it needs lm_head= (GateConfig.energy, or "
                             "drift='energy_decay')")
        plan = make_plan(optimizer, config, params, backend=backend, skip_mode=skip_mode, energy_group=energy_group)

        # What torch.optim.Optimizer.__init__ sets up, minus param_groups/state/defaults (delegated below).
        for k, v in _optimizer_base_attrs().items():
            setattr(self, k, type(v)() if isinstance(v, dict) else v)
        self._zero_grad_profile_name = "Optimizer.zero_grad#GatedOptimizer.zero_grad"

        self.optimizer = optimizer
        self._config = config
        self._skip_mode = skip_mode
        self._plan = plan
        self._energy_group = energy_group
        self._meter = EnergyMeter(params, plan, group=energy_group)
        self._max_grad_norm: float | None = None
        self._fold_clip = False
        self.max_grad_norm = max_grad_norm  # validated by the setters
        self.fold_clip = fold_clip
        self._grad_norm: torch.Tensor | None = None
        self._pending_drift: dict[str, torch.Tensor] = {}
        self._gate = GateState.create(config.window, plan.device)
        self._reuse_index = 1
        self._reuse_index_set = False
        self._passes_ticket = 0
        self._warned_host_path = False
        self._warned_no_reuse_index = False
        self._stop_flag = _HostStopFlag(plan.device)
        if energy_hook:
            if plan.skip_path != "found_inf":
                warnings.warn(
                    f"GatedOptimizer(energy_hook=True): not used with {type(optimizer).__name__}"
                    f"{' and skip_mode=host' if skip_mode == 'host' else ' without fused=True'}: a GradScaler "
                    "unscales such an optimizer's gradients in place before step() without telling it, so a "
                    "measurement taken in backward could be of scaled gradients. The energy is measured in step().",
                    stacklevel=2,
                )
            else:
                self._meter.attach_hook()
        if config.energy and isinstance(lm_head, nn.Module):
            watch_tied(lm_head, params)  # the model is unknown here: a tie is told at the head's first forward

    # ------------------------------------------------------------------ delegation (the wrapper contract)
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._replan()  # a group that is not fused changes the skip path
        if self._max_grad_norm is not None:
            check_clip_backend(self._plan.backend, self.optimizer)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler hands us grad_scale/found_inf attributes exactly when the inner optimizer would take them.
        return self._plan.skip_path == "found_inf"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._discard_recorded()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        ps = self._meter.params
        n = sum(p.numel() for p in ps)
        return f"GatedOptimizer({self.optimizer!r},\n lm_head={len(ps)} tensor(s), {n} elements,\n {self.config})"

    def __getstate__(self) -> dict[str, Any]:
        # Like torch's optimizers, a copy/pickle carries no per-instance patches of step() (an LR scheduler wraps
        # the instance's step in a closure over *this* object: copied, it would step the original).
        state = self.__dict__.copy()
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)  # (not Optimizer.__setstate__: it would patch step() and edit the inner defaults)

    # ------------------------------------------------------------------ settings
    @property
    def config(self) -> GateConfig:
        """The gate's :class:`GateConfig` (read-only: the gate state is shaped by it; build a new optimizer, or load a
        checkpoint, to change it)."""
        return self._config

    @config.setter
    def config(self, value: Any) -> None:
        raise AttributeError(
            "GatedOptimizer.config is read-only: the gate state was built for it (window size, rule); "
            "construct a new GatedOptimizer with the new GateConfig"
        )

    @property
    def plan(self) -> Plan:
        """The :class:`~dgg_fused.plan.Plan` every step follows (resolved at construction; read-only)."""
        return self._plan

    @property
    def backend(self) -> str:
        """The ``backend=`` this optimizer was built with (read-only: :attr:`plan` holds what it resolved to)."""
        return self._plan.backend

    @property
    def skip_mode(self) -> str:
        """The ``skip_mode=`` this optimizer was built with (read-only: :attr:`plan` holds the skip path)."""
        return self._skip_mode

    @skip_mode.setter
    def skip_mode(self, value: Any) -> None:
        raise AttributeError(
            "GatedOptimizer.skip_mode is read-only: the skip path was resolved at construction (opt.plan); "
            "construct a new GatedOptimizer with the new skip_mode"
        )

    @property
    def max_grad_norm(self) -> float | None:
        """Total-norm clipping inside :meth:`step` (None: off). Settable: a positive finite number or None."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: Any) -> None:
        if value is not None:
            if not is_real(value) or not (0.0 < float(value) < float("inf")):
                raise ValueError(f"max_grad_norm must be a positive finite number or None, got {value!r}")
            value = float(value)
            check_clip_backend(self._plan.backend, self.optimizer)
        self._max_grad_norm = value

    @property
    def fold_clip(self) -> bool:
        """Fold the clip coefficient into a fused step's ``grad_scale`` (see the class docstring). Settable: a bool."""
        return self._fold_clip

    @fold_clip.setter
    def fold_clip(self, value: Any) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"fold_clip must be a bool, got {type(value).__name__}")
        self._fold_clip = value

    @property
    def energy_group(self) -> Any:
        """Process group of a hand-sharded lm_head whose plain-tensor energy is all-reduced (None: not sharded)."""
        return self._energy_group

    @energy_group.setter
    def energy_group(self, group: Any) -> None:
        if group is not None:
            _check_group(group)
        self._energy_group = group
        self._replan()

    @property
    def energy_hook(self) -> bool:
        """Whether the lm_head energy is measured in post-accumulate-grad hooks (``energy_hook=True`` on the
        sync-free path; see the class docstring)."""
        return self._meter.hooked

    @property
    def lm_head_params(self) -> tuple[torch.Tensor, ...]:
        """The lm_head parameters whose gradient energy the gate watches (empty for a drift-only gate)."""
        return tuple(self._meter.params)

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """Total gradient L2 norm (unscaled, before clipping) of the last :meth:`step` with ``max_grad_norm``; 0-d
        float32 device tensor (what ``clip_grad_norm_`` returns), or None."""
        return self._grad_norm

    def _replan(self, device: torch.device | None = None) -> None:
        self._plan = make_plan(
            self.optimizer, self._config, self._meter.params, backend=self._plan.backend,
            skip_mode=self._skip_mode, energy_group=self._energy_group, device=device or self._plan.device,
        )  # fmt: skip
        self._meter.set_plan(self._plan, self._energy_group)

    def _follow_device(self, device: torch.device) -> None:
        """The lm_head moved (e.g. ``model.cuda()`` after construction): the gate state follows it."""
        self._replan(device)
        self._gate.to(device)
        self._stop_flag = _HostStopFlag(device)

    # ------------------------------------------------------------------ reuse bookkeeping
    @property
    def reuse_index(self) -> int:
        """The current reuse pass k (1 = on-policy), as last set by :meth:`set_reuse_index`."""
        return self._reuse_index

    def set_reuse_index(self, k: int) -> None:
        """Declare which pass over the current rollout batch the next steps belong to.

        ``k == 1`` starts a new batch (clears :attr:`reuse_stopped`; the first one after a reuse pass also restarts
        the first-pass energy mean of ``drift="energy_decay"``, so calling it once per micro-step of a first pass
        is fine); ``k > 1`` is a reuse pass, on which the gate may trip once its window is full. Costs a few tiny
        device writes, no sync.
        """
        if not is_int(k):
            raise TypeError(f"set_reuse_index expects an int, got {type(k).__name__}")
        k = int(k)
        if not (1 <= k <= self.config.max_reuse):
            raise ValueError(f"reuse index must be in [1, max_reuse={self.config.max_reuse}], got {k}")
        self._reuse_index = k
        self._reuse_index_set = True
        self._gate.set_reuse_index(k)
        if k == 1:
            self._stop_flag.clear()

    @property
    def reuse_stopped(self) -> bool:
        """True once the gate has tripped on the current batch: get fresh rollouts (never, with
        ``action="watch"`` or ``"scale"``).

        Read from a host copy that :meth:`step` made asynchronously, so it never stalls the device. On CUDA it can
        lag behind steps still queued on the GPU (those steps are skipped on the device regardless, so a late
        answer costs compute, never correctness); :meth:`poll_reuse_stopped` with ``block=True`` waits instead.
        On CPU it is always current.
        """
        return self.poll_reuse_stopped(block=False)

    def poll_reuse_stopped(self, block: bool = False) -> bool:
        """:attr:`reuse_stopped`, optionally waiting for the last step's copy to land (``block=True``)."""
        return self._stop_flag.poll(block)

    def passes(self, max_reuse: int | None = None, *, block: bool = False) -> Iterator[int]:
        """Iterate the reuse passes of one rollout batch: yields k = 1, 2, ... and stops when the gate trips.

        ``for k in opt.passes(): ...`` is the loop of the README: it calls :meth:`set_reuse_index` for you.
        ``block=True`` waits for each step's decision on CUDA instead of possibly running one wasted pass.
        A new ``passes()`` supersedes any earlier one of this optimizer (they share one reuse index): an abandoned
        iterator is harmless, and resuming a superseded one (nested loops) raises ``RuntimeError``.
        """
        kmax = self.config.max_reuse if max_reuse is None else max_reuse
        if not is_int(kmax) or not (1 <= kmax <= self.config.max_reuse):
            raise ValueError(f"passes(max_reuse=...) must be an int in [1, {self.config.max_reuse}], got {kmax!r}")
        self._passes_ticket += 1
        return self._passes(int(kmax), block, self._passes_ticket)

    def _passes(self, kmax: int, block: bool, ticket: int) -> Iterator[int]:
        for k in range(1, kmax + 1):
            if self._passes_ticket != ticket:
                raise RuntimeError(
                    "GatedOptimizer.passes(): this iterator was superseded by a later opt.passes() (nested passes() "
                    "loops of one optimizer share one reuse index)"
                )
            self.set_reuse_index(k)
            if self.poll_reuse_stopped(block=block):
                return
            yield k

    # ------------------------------------------------------------------ what a step is fed
    def accumulating(self) -> contextlib.AbstractContextManager[None]:
        """Context for the backward passes of non-final micro-batches under gradient accumulation: with
        ``energy_hook=True`` they do not measure the energy (only the last backward before :meth:`step` needs to).
        Harmless otherwise; never needed for correctness (a gradient accumulated after a measurement makes it
        stale, and the step then measures)::

            for i, micro in enumerate(micro_batches):
                with opt.accumulating() if i < len(micro_batches) - 1 else contextlib.nullcontext():
                    loss_fn(model, micro).backward()
            opt.step()
        """
        return self._meter.pause_hook()

    def _discard_recorded(self) -> None:
        self._meter.discard()
        self._pending_drift = {}

    def record_energy(
        self, grad_scale: torch.Tensor | None = None, *, energy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Measure the lm_head gradient energy now and use it at the next :meth:`step`.

        Call it where the gradients are the ones the gate should see — e.g. before ``clip_grad_norm_`` (which
        rescales them), or after changing them in a way autograd's version counter does not see
        (``p.grad.data.mul_``) when ``energy_hook=True``. ``grad_scale`` (a GradScaler's scale tensor) divides the
        energy by ``grad_scale**2`` when the gradients are still scaled. ``energy``: hand in an energy measured
        elsewhere instead (a 0-d floating tensor: the *global*, unscaled sum of squares of the lm_head gradient);
        it is then used as is (divided by ``grad_scale**2`` if that is given too).
        Returns the 0-d float32 energy (device tensor, no sync). :meth:`zero_grad` discards it, and so does any
        other way of discarding the gradients it was measured on (``model.zero_grad()``, a step skipped by a
        GradScaler before it reached this optimizer): the next step then measures afresh.
        """
        meter = self._meter
        if not meter.params:
            raise RuntimeError("GatedOptimizer: this drift-only gate (lm_head=None) has no lm_head energy to measure")
        if energy is not None:
            _check_one_float(energy, "record_energy(energy=...) takes a 0-d floating tensor")
            e = Energy(energy.detach().reshape(()).to(torch.float32), grad_scale)
        else:
            e = meter.measure(grad_scale, partials=False)
        meter.record(e)
        return e.total()

    def record_drift(self, **stats: torch.Tensor) -> None:
        """Hand the gate this step's policy-drift statistics (used by a gate with ``GateConfig.drift`` set).

        Keyword arguments are names from :data:`dgg_fused.DRIFT_STATS` with 0-d (one-element) floating tensors,
        typically ``opt.record_drift(**dgg_fused.drift_stats(logp_new, logp_old, mask))`` computed in the loss.
        They stay on the device (no sync) and are used by the next :meth:`step`; :meth:`zero_grad` discards them.
        A gate that watches no drift statistic ignores them, so a trainer can always call this.
        """
        for name, value in stats.items():
            if name not in DRIFT_STATS:
                raise ValueError(f"record_drift: unknown statistic {name!r}; known: {DRIFT_STATS}")
            _check_one_float(value, f"record_drift: {name} must be a one-element floating tensor")
        self._pending_drift.update({k: v.detach().reshape(()) for k, v in stats.items()})

    # ------------------------------------------------------------------ the step: decide_, then apply_
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Measure the lm_head energy, update the gate and apply (or exactly skip) the inner step.

        No host sync on the sync-free path. The closure, if any, is evaluated once here (under
        ``torch.enable_grad``) and the inner optimizer is stepped without it. This optimizer's step hooks run around
        the whole gated step (:meth:`step_hooks`); torch's global optimizer hooks run once, around the inner step,
        when the inner step runs. A GradScaler hands its ``grad_scale`` / ``found_inf`` here as attributes (torch's
        protocol); they become :meth:`decide_`'s arguments.
        """
        args, kwargs = self._pre_hooks((closure,) if closure is not None else (), {})
        closure = args[0] if args else kwargs.get("closure")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.apply_(
            self.decide_(grad_scale=getattr(self, "grad_scale", None), external_skip=getattr(self, "found_inf", None))
        )
        self._post_hooks(args, kwargs)
        return loss

    @contextlib.contextmanager
    def step_hooks(self, *args: Any, **kwargs: Any) -> Iterator[tuple[tuple, dict]]:
        """Run this optimizer's step pre-hooks (``register_step_pre_hook``) on entry and its post-hooks on a normal
        exit, around one training step, as :meth:`step` does; yields ``(args, kwargs)`` as the pre-hooks left
        them. For an engine that splits a training step into :meth:`decide_` and several :meth:`apply_` calls: it
        wraps the decision in it, once per training step."""
        args, kwargs = self._pre_hooks(args, kwargs)
        yield args, kwargs
        self._post_hooks(args, kwargs)

    def _pre_hooks(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for hook in list(self._optimizer_step_pre_hooks.values()):
            res = hook(self, args, kwargs)
            if res is not None:
                args, kwargs = res
        return args, kwargs

    def _post_hooks(self, args: tuple, kwargs: dict) -> None:
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, args, kwargs)

    def decide_(
        self,
        *,
        energy: torch.Tensor | None = None,
        grad_scale: torch.Tensor | None = None,
        external_skip: torch.Tensor | None = None,
    ) -> StepDecision:
        """The gate's half of a step: measure the energy, clip (``max_grad_norm``), update the gate and publish
        :attr:`reuse_stopped`; returns how the inner step must run (:meth:`apply_` runs it). No parameter and no
        inner optimizer state is touched; no host sync on the sync-free path.

        Args:
            energy: this step's lm_head energy measured elsewhere (a 0-d floating tensor: the global, unscaled sum of
                squares, e.g. of ZeRO partitions), used instead of measuring the gradients.
            grad_scale: a GradScaler's scale while the gradients are still scaled (the energy is divided by its
                square; it is handed to the fused inner step, as torch's protocol does).
            external_skip: a 0-d tensor, > 0 when the caller drops this step anyway (a loss-scaler overflow): not a
                trip; the gate ignores the step. A fused inner step receives it as ``found_inf`` (combined with the
                gate's); with any other inner optimizer dropping the step is the caller's (as a GradScaler does).
        """
        config, plan = self._config, self._plan
        given = None
        if energy is not None:
            if not config.reads_energy:
                raise ValueError("decide_(energy=...): this gate's rule reads no lm_head energy (GateConfig.energy, "
                                 "drift='energy_decay')")
            _check_one_float(energy, "decide_(energy=...) takes a 0-d floating tensor")
            given = Energy(energy.detach().reshape(()).to(torch.float32))
        self._warn_no_reuse_index()
        drift = self._take_drift()
        on_device = plan.skip_path == "found_inf" and not fused_sgd_unprimed(self.optimizer)
        # a hook's measurement is of the gradients as backward left them: unusable if a GradScaler unscaled them
        # in place since (it says so by handing found_inf without grad_scale)
        unscaled = plan.skip_path != "found_inf" or (external_skip is not None and grad_scale is None)
        m = self._meter.for_step(
            given=given, need_energy=config.reads_energy, scaler_scale=grad_scale, scaler_unscaled=unscaled,
            param_groups=self.param_groups, max_grad_norm=self._max_grad_norm, fold=self._fold_clip and on_device,
        )  # fmt: skip
        if m.grad_norm is not None:
            self._grad_norm = m.grad_norm
        if m.energy is not None and m.energy.value.device != plan.device:
            self._follow_device(m.energy.value.device)
        device = self._gate.device
        external = None
        if external_skip is not None:  # an overflowed step is the caller's to drop: the gate ignores it
            external = external_skip if external_skip.device == device else external_skip.to(device)
            external = external.to(torch.float32).clamp(0.0, 1.0)
        skip = gate_step_(
            self._gate, m.energy.value if m.energy is not None else None, config, external, drift=drift,
            grad_scale=m.energy.grad_scale if m.energy is not None else None, impl=self._plan.gate_impl,
        )  # fmt: skip
        if config.action == "watch":
            skip = None  # nothing to skip, nothing to read
        elif not on_device:
            self._warn_host_path()
        decision = decide(
            on_device, skip, external=external, scaler_inf=external_skip, reuse_index=self._reuse_index,
            optimizer=self.optimizer, grad_scale=m.inner_scale,
            lr_scale=self._gate.scale if config.action == "scale" else None,
        )  # fmt: skip
        self._stop_flag.publish(self._gate.stopped)
        return decision

    def apply_(self, decision: StepDecision) -> None:
        """Run the inner optimizer's step under ``decision`` (from :meth:`decide_`): exactly skipped, or applied with
        its ``found_inf`` / ``grad_scale`` (and, with ``action="scale"`` on a reuse pass, every group's learning rate
        multiplied by the gate's factor for this call only). Engines call it once per client step of a training
        step."""
        apply_(self.optimizer, decision)

    def _take_drift(self) -> torch.Tensor | None:
        drift = None
        if self._config.takes_drift:
            drift = self._pending_drift.get(self._config.drift)
            if drift is None:
                raise RuntimeError(
                    f"GatedOptimizer.step(): the gate watches {self._config.drift!r} but this step has none; call "
                    f"opt.record_drift({self._config.drift}=...) before step() (see dgg_fused.drift_stats)"
                )
        self._pending_drift = {}
        return drift

    def _warn_host_path(self) -> None:
        if self._warned_host_path or self._skip_mode == "host" or self._plan.skip_path != "host":
            return
        self._warned_host_path = True
        warnings.warn(HOST_PATH_WARNING.format(name=type(self.optimizer).__name__), stacklevel=4)

    def _warn_no_reuse_index(self) -> None:
        if self._reuse_index_set or self._warned_no_reuse_index or self.config.max_reuse == 1:
            return
        self._warned_no_reuse_index = True
        warnings.warn(
            f"GatedOptimizer.step() with max_reuse={self.config.max_reuse} but set_reuse_index() was never called: "
            "every step counts as a first pass (k = 1), so the gate can never trip. Iterate `for k in "
            "opt.passes():` or call opt.set_reuse_index(k) before each pass.",
            stacklevel=4,
        )

    # ------------------------------------------------------------------ metrics
    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Gate metrics of the last step as 0-d device tensors (views of live state: clone to keep them), only the
        ones the configured rule reads.

        Always: ``gated`` (1.0 if the rule tripped on this step; with ``action="watch"``: fired, nothing done),
        ``skipped`` (1.0 if this step was dropped: tripped, or on a stopped batch), ``steps``, ``gated_steps``
        (dropped steps), ``stopped_batches`` (trips; with ``action="watch"`` the steps on which the rule fired),
        ``reuse_index``. The energy rule (``config.energy``): ``energy`` (lm_head gradient energy), ``statistic``
        (the Z-score compared with tau), ``window_filled`` (reference observations its window holds; it can trip
        only once that reaches ``config.window``: the warm-up made visible). A drift statistic (``config.drift``):
        ``drift`` and ``drift_statistic`` (its value, and what its rule compared: the value itself, or its Z-score),
        with ``drift_rule="zscore"`` also ``drift_window_filled`` (its own window's observations); for
        ``drift="energy_decay"`` the decay the gate computed, and ``energy`` (what it was computed from). Both rules:
        ``energy_trips`` and ``drift_trips``, the trips on which each rule fired (with ``combine="any"`` one trip can
        count in both). ``action="scale"``: ``scale``, the learning-rate factor of the last step (1.0 unscaled, in
        [0, 1) scaled, 0.0 dropped for a non-finite statistic).
        """
        return self._gate.metrics(self.config)

    def get_metrics(self) -> dict[str, float | int]:
        """:attr:`metrics` as Python numbers for a logger. This is the one call that syncs: do it when logging."""
        return self._gate.metrics_host(self.config)

    # ------------------------------------------------------------------ checkpoints (format: dgg_fused.checkpoint)
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's ``state_dict()`` plus the gate's state under the ``"dgg"`` key."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = dict(self.optimizer.state_dict())
        sd[checkpoint.STATE_KEY] = checkpoint.gate_entry(self.config, self._reuse_index, self._gate)
        for hook in self._optimizer_state_dict_post_hooks.values():
            res = hook(self, sd)
            if res is not None:
                sd = res
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict` (or a plain inner-optimizer one, which leaves the gate state as it is).

        Everything is validated before anything is written: a bad checkpoint raises and changes nothing.
        The current :attr:`config` is kept; a checkpoint written with another ``window`` cannot be loaded.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            res = hook(self, state_dict)
            if res is not None:
                state_dict = res
        sd = dict(state_dict)
        entry = sd.pop(checkpoint.STATE_KEY, None)
        parsed = None
        if entry is not None:
            parsed = checkpoint.parse_gate_entry(entry, self.config, self._gate.device)
        self.optimizer.load_state_dict(sd)
        if parsed is not None:
            k, scratch = parsed
            self._gate.load_state_dict(scratch.tensors(), action=self.config.action)
            self._reuse_index = k
            self._reuse_index_set = True
            self._discard_recorded()
            self._stop_flag = _HostStopFlag(self._gate.device)
            self._stop_flag.publish(self._gate.stopped)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


# This class runs its step hooks itself, around the whole gated step (the closure, the gate and the inner step),
# and the inner optimizer's step -- wrapped by torch -- runs torch's global optimizer hooks once. torch marks a
# step function it has wrapped with `hooked = True`, and Optimizer.__init__ / __setstate__ wrap only unmarked
# ones; this wrapper calls neither, and the mark keeps any later torch-internal call of _patch_step_function
# from wrapping it a second time (which would run the global hooks twice). tests/test_optimizer.py checks both on
# the installed torch.
GatedOptimizer.step.hooked = True  # type: ignore[attr-defined]


def _lm_head_params(lm_head: Any, optimizer: torch.optim.Optimizer, config: GateConfig) -> list[torch.Tensor]:
    """The validated lm_head parameters (``[]`` for ``lm_head=None``, allowed without the energy rule)."""
    if lm_head is None:
        if config.energy:
            raise TypeError("lm_head= is required by the lm_head-energy rule (GateConfig.energy=True)")
        if config.reads_energy:
            raise TypeError(f"lm_head= is required by drift={config.drift!r}: the gate computes it from the lm_head "
                            "energy")
        return []
    params = params_of(lm_head)
    if not params:
        raise ValueError(f"lm_head= ({type(lm_head).__name__}) has no parameters")
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for p in params:
        if not p.requires_grad:
            raise ValueError(f"lm_head parameter of shape {tuple(p.shape)} does not require grad: nothing to gate")
        if id(p) not in in_opt:
            raise ValueError(
                f"lm_head parameter of shape {tuple(p.shape)} is not among the optimizer's parameters; "
                "build the optimizer from the same model's parameters"
            )
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"lm_head parameters must live on one device, got {sorted(map(str, devices))}")
    return params


def _check_one_float(value: Any, message: str) -> None:
    """``ValueError(message + what was given)`` unless ``value`` is a one-element floating tensor."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{message}, got {got}")


def _check_group(group: Any) -> None:
    """``group`` is a process group of this (initialized) run that this rank belongs to."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("energy_group: torch.distributed is not initialized")
    try:
        rank = dist.get_rank(group)
    except Exception as exc:  # not a group of this run (torch raises ValueError/RuntimeError/KeyError here)
        raise TypeError(f"energy_group must be a process group of this run, got {type(group).__name__}") from exc
    if rank < 0:
        raise ValueError("energy_group: this rank is not a member of the group")
