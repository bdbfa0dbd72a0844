"""GatedOptimizer: Dynamic Gradient Gating around any ``torch.optim.Optimizer``.

Design (docs/design.md has the long form):

* **Exact skip without a host sync.** Torch's fused Adam/AdamW/SGD/Adagrad read a 0-d float32 ``found_inf``
  tensor (the GradScaler protocol) and, when it is exactly 1.0, skip their whole update on the device and undo
  their ``step`` increment. The gate writes its decision into such a tensor, combined by ``max`` with a
  GradScaler's own ``found_inf``, so a gated step leaves parameters and optimizer state bit-identical and the
  host never waits for the device. Optimizers without the protocol take a host-side decision: one sync on reuse
  passes (k > 1) only, with a one-time warning.
* **The wrapper contract.** ``param_groups``, ``state`` and ``defaults`` are properties that always read the inner
  optimizer's current objects, so LR schedulers keep reaching the inner optimizer even after
  ``inner.load_state_dict`` replaced its groups (accelerate does this round trip at ``prepare`` time). The gate's
  own state lives under the ``"dgg"`` key of :meth:`state_dict`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
from torch import nn

from . import checkpoint
from .config import DRIFT_STATS, GateConfig, is_int, is_real
from .energy import Energy, EnergyMeter
from .ops import BACKENDS
from .gate import GateState, impl_for_backend, impl_for_config, resolve_impl, step_resolved_

__all__ = ["GatedOptimizer", "SKIP_MODES"]

#: ``"auto"``: the sync-free ``found_inf`` path when the inner optimizer supports it, else the host path.
#: ``"found_inf"``: require the sync-free path (``ValueError`` at construction if unsupported).
#: ``"host"``: always decide on the host (one sync per reuse-pass step); works with any optimizer.
SKIP_MODES = ("auto", "found_inf", "host")

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


def _lm_head_params(lm_head: Any) -> list[torch.Tensor]:
    if isinstance(lm_head, nn.Module):
        params = list(lm_head.parameters())
        what = f"module {type(lm_head).__name__}"
        n_mod = sum(1 for m in lm_head.modules() if any(True for _ in m.parameters(recurse=False)))
        if n_mod > 3:  # an output projection is a module or two (weight, bias, maybe a norm); not a whole model
            raise ValueError(
                f"lm_head= is a {type(lm_head).__name__} with parameters in {n_mod} modules: pass the output "
                "projection (e.g. model.lm_head, or dgg_fused.find_lm_head(model)), not the whole model"
            )
    elif isinstance(lm_head, torch.Tensor):
        params, what = [lm_head], "tensor"
    elif isinstance(lm_head, (str, bytes, dict)) or not isinstance(lm_head, Iterable):
        raise TypeError(
            "lm_head= must be an nn.Module, a Parameter or an iterable of Parameters, "
            f"got {type(lm_head).__name__}"
        )
    else:
        params = list(lm_head)
        what = "iterable"
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"lm_head= iterable must hold Parameters, found {type(p).__name__}")
    uniq: list[torch.Tensor] = []
    seen: set[int] = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            uniq.append(p)
    if not uniq:
        raise ValueError(f"lm_head= ({what}) has no parameters")
    for p in uniq:
        if not p.requires_grad:
            raise ValueError(f"lm_head parameter of shape {tuple(p.shape)} does not require grad: nothing to gate")
    devices = {p.device for p in uniq}
    if len(devices) > 1:
        raise ValueError(f"lm_head parameters must live on one device, got {sorted(map(str, devices))}")
    return uniq


class StepDecision(NamedTuple):
    """How the inner step of one :meth:`GatedOptimizer.step` runs (returned by :meth:`GatedOptimizer.decide_`).

    ``run_inner``: False when the host path decided to skip it; ``found_inf``: the 0-d float32 device flag handed
    to a fused optimizer (1.0 = skip on the device; None on the host path without a GradScaler); ``grad_scale``: the
    scale handed with it (the GradScaler's, or the folded clip coefficient's; None for none)."""

    run_inner: bool
    found_inf: torch.Tensor | None
    grad_scale: torch.Tensor | None


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
        optimizer: any ``torch.optim.Optimizer`` holding the lm_head parameters. ``fused=True`` Adam, AdamW,
            SGD and Adagrad take the sync-free path.
        lm_head: the output projection: an ``nn.Module`` (all its parameters), a ``Parameter``, or an iterable
            of Parameters. :func:`dgg_fused.find_lm_head` finds it in Hugging Face models. May be None only with
            ``config.energy=False`` (a drift-only gate reads no lm_head).
        config: a :class:`GateConfig`; defaults to ``GateConfig()`` (the paper's lm_head-energy rule). With
            ``config.drift`` set, hand the gate each step's drift statistics with :meth:`record_drift`.
        skip_mode: one of :data:`SKIP_MODES`.
        backend: ``"auto"`` or one of :data:`dgg_fused.ops.BACKENDS`: the kernels of the energy *and* of the gate
            update (``"torch"``: the float64 reference energy and the reference rule; ``"cpp"``/``"cuda"``/
            ``"triton"``: that kernel and that gate twin). Resolved here: unknown names raise ``ValueError``, names
            unavailable on the lm_head's device ``RuntimeError``.
        energy_group: process group of a hand-sharded (vocab-parallel) lm_head, see :mod:`dgg_fused.distributed`
            (also settable later as :attr:`energy_group`).
        max_grad_norm: if set, clip the total gradient norm (all parameters, L2) to this value inside
            :meth:`step`, the way ``torch.nn.utils.clip_grad_norm_`` does (multiply by the clamped coefficient
            ``min(1, max_grad_norm / (norm + 1e-6))``, on the device, no host sync). It shares the gate's pass: the
            lm_head gradients are read once for both. The gate sees the pre-clip energy. Unscaled norm under a
            GradScaler. The pre-clip norm of the last step is :attr:`grad_norm`.
        fold_clip: with ``max_grad_norm``, on the sync-free path (a fused optimizer that honours ``found_inf``),
            hand the clip coefficient to the fused kernel as ``grad_scale = scaler_scale / coef`` (``1 / coef``
            without a GradScaler) instead of multiplying every gradient by ``coef`` first: one pass over all the
            gradients less. The kernel divides by that scale, so parameters differ from ``clip_grad_norm_`` + step
            by rounding only (division by ``1/coef`` instead of multiplication by ``coef``; see docs/design.md).
            The fused kernel writes the gradient it used back into ``.grad`` (clipped, unscaled) on a step it
            applies; on a skipped step ``.grad`` is left unclipped. Elsewhere (host path, non-fused optimizers) the
            gradients are scaled in place as with ``fold_clip=False``.
        energy_hook: measure the lm_head energy in post-accumulate-grad hooks during backward (on CUDA on a side
            stream) instead of inside :meth:`step`, so the read overlaps the rest of backward. The step uses the
            hook's measurement only when it is exactly what the step would measure (the same gradient tensors,
            unchanged since: ``Tensor._version``; a GradScaler that unscaled them in place makes the step measure
            again), so results do not change. Gradient accumulation: every backward measures its accumulated
            gradient and the last one counts; run the non-final micro-batches' backward inside
            :meth:`accumulating` to skip their reads. Only on the sync-free path (elsewhere a GradScaler unscales
            the gradients in place without telling this optimizer): with another optimizer, or
            ``skip_mode="host"``, a warning says so and the step measures. Distributed energies (DTensor, energy
            group, multi-process runs) and CUDA graph captures are measured in the step (a one-time warning says
            why). The hooks hold this optimizer weakly and go away with it.

    Raises:
        TypeError: ``optimizer`` is not an Optimizer (or is already gated, or needs closure re-evaluation like
            LBFGS); ``lm_head`` is of the wrong type.
        ValueError: an lm_head parameter is not in ``optimizer``, does not require grad, or the config is bad;
            ``lm_head`` is a whole model; ``backend`` is unknown.
        RuntimeError: ``backend`` is not available for the lm_head's device.
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
        if skip_mode not in SKIP_MODES:
            raise ValueError(f"skip_mode must be one of {SKIP_MODES}, got {skip_mode!r}")
        if lm_head is None:
            if config.energy:
                raise TypeError("lm_head= is required by the lm_head-energy rule (GateConfig.energy=True)")
            params = []
        else:
            params = _lm_head_params(lm_head)
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for p in params:
            if id(p) not in in_opt:
                raise ValueError(
                    f"lm_head parameter of shape {tuple(p.shape)} is not among the optimizer's parameters; "
                    "build the optimizer from the same model's parameters"
                )
        if skip_mode == "found_inf" and not _supports_found_inf(optimizer):
            raise ValueError(
                f"skip_mode='found_inf' needs an optimizer that honours found_inf (torch Adam/AdamW/SGD/Adagrad "
                f"with fused=True); {type(optimizer).__name__} does not"
            )
        if max_grad_norm is not None:
            if not is_real(max_grad_norm) or not (0.0 < float(max_grad_norm) < float("inf")):
                raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
            max_grad_norm = float(max_grad_norm)
        if energy_group is not None:
            _check_group(energy_group)
        if not isinstance(fold_clip, bool):
            raise TypeError(f"fold_clip must be a bool, got {type(fold_clip).__name__}")
        if not isinstance(energy_hook, bool):
            raise TypeError(f"energy_hook must be a bool, got {type(energy_hook).__name__}")
        if energy_hook and not params:
            raise ValueError("energy_hook=True measures the lm_head energy: it needs lm_head= (GateConfig.energy)")
        device = params[0].device if params else _first_device(optimizer)
        # backend= is resolved here, for the energy and for the gate: a bad or unavailable name raises now
        backend = _known_backend(backend)
        energy = EnergyMeter(params, backend=backend, group=energy_group) if params else None
        gate_impl = _gate_impl_for(backend, config, device)

        # What torch.optim.Optimizer.__init__ sets up, minus param_groups/state/defaults (delegated below).
        for k, v in _optimizer_base_attrs().items():
            setattr(self, k, type(v)() if isinstance(v, dict) else v)
        self._zero_grad_profile_name = "Optimizer.zero_grad#GatedOptimizer.zero_grad"

        self.optimizer = optimizer
        self._config = config
        self.skip_mode = skip_mode
        self._backend = backend
        self.max_grad_norm = max_grad_norm
        self._grad_norm: torch.Tensor | None = None
        self._lm_head = params
        self._energy = energy
        self._energy_group = energy_group
        self._pending_drift: dict[str, torch.Tensor] = {}
        self._gate_impl = gate_impl
        self._gate = GateState.create(config.window, device)
        self._reuse_index = 1
        self._reuse_index_set = False
        self._in_passes = False
        self._warned_host_path = False
        self._warned_no_reuse_index = False
        self._stop_flag = _HostStopFlag(device)
        self.fold_clip = fold_clip
        if energy_hook and energy is not None:
            if skip_mode == "host" or not _supports_found_inf(optimizer):
                warnings.warn(
                    f"GatedOptimizer(energy_hook=True): not used with {type(optimizer).__name__}"
                    f"{' and skip_mode=host' if skip_mode == 'host' else ' without fused=True'}: a GradScaler "
                    "unscales such an optimizer's gradients in place before step() without telling it, so a "
                    "measurement taken in backward could be of scaled gradients. The energy is measured in step().",
                    stacklevel=2,
                )
            else:
                energy.attach_hook()

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
    def backend(self) -> str:
        """The ``backend=`` this optimizer was built with (read-only: it was resolved at construction)."""
        return self._backend

    @property
    def energy_group(self) -> Any:
        """Process group of a hand-sharded lm_head whose plain-tensor energy is all-reduced (None: not sharded)."""
        return self._energy_group

    @energy_group.setter
    def energy_group(self, group: Any) -> None:
        if group is not None:
            _check_group(group)
        self._energy_group = group
        if self._energy is not None:
            self._energy.set_group(group)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler hands us grad_scale/found_inf attributes exactly when the inner optimizer would take them.
        return self.skip_mode != "host" and _supports_found_inf(self.optimizer)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    @property
    def energy_hook(self) -> bool:
        """Whether the lm_head energy is measured in post-accumulate-grad hooks (``energy_hook=True`` on the
        sync-free path; see the class docstring)."""
        return self._energy is not None and self._energy.hooked

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
        if self._energy is None:
            return contextlib.nullcontext()
        return self._energy.pause_hook()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._discard_recorded()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self._lm_head)
        return f"GatedOptimizer({self.optimizer!r},\n lm_head={len(self._lm_head)} tensor(s), {n} elements,\n {self.config})"

    def __getstate__(self) -> dict[str, Any]:
        # Like torch's optimizers, a copy/pickle carries no per-instance patches of step() (an LR scheduler wraps
        # the instance's step in a closure over *this* object: copied, it would step the original).
        state = self.__dict__.copy()
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"fold_clip": False, **state})  # pickles from before fold_clip existed

    @property
    def lm_head_params(self) -> tuple[torch.Tensor, ...]:
        """The lm_head parameters whose gradient energy the gate watches (empty for a drift-only gate)."""
        return tuple(self._lm_head)

    # ------------------------------------------------------------------ reuse bookkeeping
    @property
    def reuse_index(self) -> int:
        """The current reuse pass k (1 = on-policy), as last set by :meth:`set_reuse_index`."""
        return self._reuse_index

    def set_reuse_index(self, k: int) -> None:
        """Declare which pass over the current rollout batch the next steps belong to.

        ``k == 1`` starts a new batch (clears :attr:`reuse_stopped`); ``k > 1`` is a reuse pass, on which the gate
        may trip once its window is full. Costs one tiny device write, no sync.
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
        """True once the gate has tripped on the current batch: get fresh rollouts.

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
        Nesting two ``passes()`` loops of one optimizer raises ``RuntimeError`` (they would share one reuse index).
        """
        kmax = self.config.max_reuse if max_reuse is None else max_reuse
        if not is_int(kmax) or not (1 <= kmax <= self.config.max_reuse):
            raise ValueError(f"passes(max_reuse=...) must be an int in [1, {self.config.max_reuse}], got {kmax!r}")
        if self._in_passes:
            raise RuntimeError("GatedOptimizer.passes() is already iterating: nested passes() loops share one reuse index")
        return self._passes(int(kmax), block)

    def _passes(self, kmax: int, block: bool) -> Iterator[int]:
        self._in_passes = True
        try:
            for k in range(1, kmax + 1):
                self.set_reuse_index(k)
                if self.poll_reuse_stopped(block=block):
                    return
                yield k
        finally:
            self._in_passes = False

    # ------------------------------------------------------------------ energy
    def _discard_recorded(self) -> None:
        if self._energy is not None:
            self._energy.discard()
        self._pending_drift = {}

    def _meter(self) -> EnergyMeter:
        if self._energy is None:
            raise RuntimeError("GatedOptimizer: this drift-only gate (lm_head=None) has no lm_head energy to measure")
        return self._energy

    def record_energy(
        self, grad_scale: torch.Tensor | None = None, *, energy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Measure the lm_head gradient energy now and use it at the next :meth:`step`.

        Call it where the gradients are the ones the gate should see — e.g. before ``clip_grad_norm_`` (which
        rescales them) — or let an integration call it from a post-accumulate-grad hook. ``grad_scale`` (a
        GradScaler's scale tensor) divides the energy by ``grad_scale**2`` when the gradients are still scaled.
        ``energy``: hand in an energy measured elsewhere instead (a 0-d floating tensor: the *global*, unscaled
        sum of squares of the lm_head gradient — e.g. from DeepSpeed ZeRO partitions plus an all-reduce); it is
        then used as is (divided by ``grad_scale**2`` if that is given too).
        Returns the 0-d float32 energy (device tensor, no sync). :meth:`zero_grad` discards it, and so does any
        other way of discarding the gradients it was measured on (``model.zero_grad()``, a step skipped by a
        GradScaler before it reached this optimizer): the next step then measures afresh.
        """
        meter = self._meter()
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

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """Total gradient L2 norm (unscaled, before clipping) of the last :meth:`step` with ``max_grad_norm``; 0-d
        float32 device tensor (what ``clip_grad_norm_`` returns), or None."""
        return self._grad_norm

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Measure the lm_head energy, update the gate and apply (or exactly skip) the inner step.

        No host sync on the sync-free path (see the class docstring). The closure, if any, is evaluated once here
        (under ``torch.enable_grad``) and the inner optimizer is stepped without it. This optimizer's step hooks
        run around the whole gated step; torch's global optimizer hooks run once, around the inner step, when the
        inner step runs.
        """
        args, kwargs = (closure,) if closure is not None else (), {}
        for hook in list(self._optimizer_step_pre_hooks.values()):
            res = hook(self, args, kwargs)
            if res is not None:
                args, kwargs = res
        closure = args[0] if args else kwargs.get("closure")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        d = self.decide_()
        if d.run_inner:
            self._step_inner(d.found_inf, d.grad_scale)
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, args, kwargs)
        return loss

    def decide_(self) -> "StepDecision":
        """The gate's half of :meth:`step`: measure, clip (``max_grad_norm``), update the gate and publish
        :attr:`reuse_stopped`; return how the inner step must run, without running it. :meth:`step` is
        ``decide_()`` then the inner step under the returned ``found_inf`` / ``grad_scale``. Engines whose inner
        optimizer is stepped several times per training step (DeepSpeed ZeRO: once per parameter group or
        sub-group) take one decision and apply it to every call. No host sync on the sync-free path."""
        self._warn_no_reuse_index()

        scaler_scale = getattr(self, "grad_scale", None)  # set by GradScaler when grads are still scaled
        scaler_inf = getattr(self, "found_inf", None)
        drift = None
        if self.config.uses_drift:
            drift = self._pending_drift.get(self.config.drift)
            if drift is None:
                raise RuntimeError(
                    f"GatedOptimizer.step(): the gate watches {self.config.drift!r} but this step has none; call "
                    f"opt.record_drift({self.config.drift}=...) before step() (see dgg_fused.drift_stats)"
                )
        self._pending_drift = {}
        amp_path = self._step_supports_amp_scaling
        use_found_inf = amp_path and not self._fused_sgd_unprimed()  # = self._use_found_inf()
        meter = self._energy
        recorded, current = None, False
        if meter is not None:
            # a hook's measurement is of the gradients as backward left them: unusable if a GradScaler unscaled
            # them in place since (it says so by handing found_inf without grad_scale)
            unscaled = not amp_path or (scaler_inf is not None and scaler_scale is None)
            recorded, current = meter.take_for_step(scaler_scale, scaler_unscaled=unscaled)
        energy = None
        if self.config.energy:
            if recorded is None:
                recorded, current = meter.measure(scaler_scale), True
            energy = recorded
        inner_scale = scaler_scale
        if self.max_grad_norm is not None:  # after the gate's measurement: the gate sees pre-clip gradients
            if meter is None:  # a drift-only gate: no lm_head singled out, every gradient is read by the clip
                lm = torch.zeros((), dtype=torch.float32, device=self._gate.device)
                meter = self._clip_meter()
            elif energy is not None and current:
                lm = energy.total()
            else:  # a recorded energy may predate changes of the gradients (e.g. unscaling): measure afresh
                lm = meter.measure(scaler_scale, partials=False).total()
            fold = self.fold_clip and use_found_inf
            self._grad_norm, coef = meter.clip_(lm, self.param_groups, self.max_grad_norm, scaler_scale, apply=not fold)
            if fold:  # the fused kernel divides every gradient by grad_scale: dividing by 1/coef is the clip
                inner_scale = (1.0 / coef) if scaler_scale is None else scaler_scale.to(coef.device) / coef
        device = energy.value.device if energy is not None else self._gate.device
        if device != self._gate.device:
            self._gate.to(device)
            self._gate_impl = _gate_impl_for(self._backend, self.config, device)  # the lm_head moved (e.g. .cuda())
            self._stop_flag = _HostStopFlag(device)

        external = None
        if scaler_inf is not None:  # an overflowed step is the scaler's to drop: the gate ignores it
            external = scaler_inf
            if external.device != device:
                external = external.to(device)
            external = external.to(torch.float32).clamp(0.0, 1.0)
        skip = step_resolved_(
            self._gate, energy.value if energy is not None else None, self.config, self._gate_impl,
            grad_scale=energy.grad_scale if energy is not None else None, external_skip=external, drift=drift,
        )

        run_inner = True
        if use_found_inf:
            found_inf = skip if external is None else torch.maximum(skip, external)
        else:
            self._warn_host_path()
            if self._reuse_index > 1:  # on k == 1 the gate cannot trip: no sync needed
                run_inner = not bool(skip)  # the one host sync of the fallback path
            found_inf = scaler_inf
            if run_inner and scaler_inf is not None and self._fused_sgd_unprimed():
                # torch's fused SGD would allocate its momentum uninitialised on a step the scaler drops: decide
                # that drop on the host too, once, until every buffer exists.
                run_inner = not bool(scaler_inf)
        self._stop_flag.publish(self._gate.stopped)
        return StepDecision(run_inner, found_inf, inner_scale)

    def _step_inner(self, found_inf: torch.Tensor | None, grad_scale: torch.Tensor | None) -> None:
        inner = self.optimizer
        saved = {k: inner.__dict__[k] for k in ("found_inf", "grad_scale") if k in inner.__dict__}
        if found_inf is not None:
            inner.found_inf = found_inf
        if grad_scale is not None:
            inner.grad_scale = grad_scale
        try:
            inner.step()
        finally:
            for k in ("found_inf", "grad_scale"):
                inner.__dict__.pop(k, None)
            inner.__dict__.update(saved)

    def _use_found_inf(self) -> bool:
        if self.skip_mode == "host" or not _supports_found_inf(self.optimizer):
            return False
        # torch's fused SGD allocates momentum buffers uninitialised on its first step; if that step were
        # skipped, the next one would read garbage. Decide on the host until every buffer exists.
        return not self._fused_sgd_unprimed()

    def _fused_sgd_unprimed(self) -> bool:
        inner = self.optimizer
        if not isinstance(inner, torch.optim.SGD):
            return False
        for g in inner.param_groups:
            if g.get("momentum", 0) != 0:
                for p in g["params"]:
                    if p.grad is not None and inner.state.get(p, {}).get("momentum_buffer") is None:
                        return True
        return False

    def _clip_meter(self) -> EnergyMeter:
        """The clip's gradient reader of a drift-only gate (no lm_head): an EnergyMeter over no lm_head tensor."""
        meter = self.__dict__.get("_clip_only_meter")
        if meter is None:
            meter = self._clip_only_meter = EnergyMeter.for_clip(backend=self._backend)
        return meter

    def _warn_host_path(self) -> None:
        if self._warned_host_path or self.skip_mode == "host":
            return
        self._warned_host_path = True
        if not _supports_found_inf(self.optimizer):
            warnings.warn(
                f"GatedOptimizer: {type(self.optimizer).__name__} (without fused=True) cannot skip a step on the "
                "device, so the gate's decision is read on the host: one device sync per reuse-pass step. "
                "Torch's Adam/AdamW/SGD/Adagrad with fused=True take the sync-free path.",
                stacklevel=3,
            )

    def _warn_no_reuse_index(self) -> None:
        if self._reuse_index_set or self._warned_no_reuse_index or self.config.max_reuse == 1:
            return
        self._warned_no_reuse_index = True
        warnings.warn(
            f"GatedOptimizer.step() with max_reuse={self.config.max_reuse} but set_reuse_index() was never called: "
            "every step counts as a first pass (k = 1), so the gate can never trip. Iterate `for k in "
            "opt.passes():` or call opt.set_reuse_index(k) before each pass.",
            stacklevel=3,
        )

    # ------------------------------------------------------------------ metrics
    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Gate metrics of the last step as 0-d device tensors (views of live state: clone to keep them).

        Keys: ``energy`` (lm_head gradient energy), ``statistic`` (the Z-score compared with tau), ``gated``
        (1.0 if this step tripped the gate), ``skipped`` (1.0 if this step was dropped: tripped, or on a stopped
        batch), ``steps``, ``gated_steps`` (dropped steps), ``stopped_batches`` (trips), ``reuse_index``, ``drift``
        and ``drift_statistic`` (with ``config.drift`` set only: the watched drift statistic's value, and what its
        rule compared — the value itself, or its Z-score), ``window_filled`` (reference observations the rule's
        window holds; the gate can trip only once it reaches ``config.window`` — the warm-up made visible).
        """
        out = self._gate.metrics(drift=self.config.drift is not None)
        out["window_filled"] = self._gate.window_filled(self.config)
        return out

    def get_metrics(self) -> dict[str, float | int]:
        """:attr:`metrics` as Python numbers for a logger. This is the one call that syncs: do it when logging."""
        return self._gate.metrics_host(
            drift=self.config.drift is not None, window_filled=self._gate.window_filled(self.config)
        )

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
            self._gate.load_state_dict(scratch.tensors())
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


def _check_one_float(value: Any, message: str) -> None:
    """``ValueError(message + what was given)`` unless ``value`` is a one-element floating tensor."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{message}, got {got}")


def _first_device(optimizer: torch.optim.Optimizer) -> torch.device:
    for g in optimizer.param_groups:
        for p in g["params"]:
            return p.device
    return torch.device("cpu")


def _gate_impl_for(backend: str, config: GateConfig, device: torch.device) -> str:
    """The gate implementation for ``backend=`` on ``device``; a drift gate runs the reference rule (the fused twins
    implement the energy-only rule)."""
    if config.uses_drift:
        return impl_for_config("auto", config)
    return resolve_impl(impl_for_backend(backend), device)


def _known_backend(backend: Any) -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def _check_group(group: Any) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("energy_group: torch.distributed is not initialized")

def _supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours ``found_inf``/``grad_scale`` attributes (torch's fused optimizers)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    # Every group must be fused: torch's non-fused code paths reject found_inf.
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)):
        return all(bool(g.get("fused")) for g in optimizer.param_groups)
    return False
