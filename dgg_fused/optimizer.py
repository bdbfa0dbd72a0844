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

import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .config import DRIFT_STATS, GateConfig
from .gate import CNT_GATED_STEPS, CNT_STEPS, CNT_STOPPED_BATCHES, GateState, gate_step_
from .distributed import global_grad_sumsq
from .ops import grad_sumsq_partials, resolve_epilogue

__all__ = ["GatedOptimizer", "SKIP_MODES"]

#: ``"auto"``: the sync-free ``found_inf`` path when the inner optimizer supports it, else the host path.
#: ``"found_inf"``: require the sync-free path (``ValueError`` at construction if unsupported).
#: ``"host"``: always decide on the host (one sync per reuse-pass step); works with any optimizer.
SKIP_MODES = ("auto", "found_inf", "host")

_STATE_KEY = "dgg"
_FORMAT = 1


def _lm_head_params(lm_head: Any) -> list[torch.Tensor]:
    if isinstance(lm_head, nn.Module):
        params = list(lm_head.parameters())
        what = f"module {type(lm_head).__name__}"
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
        backend: energy backend passed to :func:`dgg_fused.ops.grad_sumsq`.
        max_grad_norm: if set, clip the total gradient norm (all parameters, L2) to this value inside
            :meth:`step`, the way ``torch.nn.utils.clip_grad_norm_`` does (multiply by the clamped coefficient
            ``min(1, max_grad_norm / (norm + 1e-6))``, on the device, no host sync). It shares the gate's pass: the
            lm_head gradients are read once for both. The gate sees the pre-clip energy. Unscaled norm under a
            GradScaler. The pre-clip norm of the last step is :attr:`grad_norm`.

    Raises:
        TypeError: ``optimizer`` is not an Optimizer (or is already gated, or needs closure re-evaluation like
            LBFGS); ``lm_head`` is of the wrong type.
        ValueError: an lm_head parameter is not in ``optimizer``, does not require grad, or the config is bad.
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

        # What torch.optim.Optimizer.__init__ sets up, minus param_groups/state/defaults (delegated below).
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._zero_grad_profile_name = "Optimizer.zero_grad#GatedOptimizer.zero_grad"
        self._warned_capturable_if_run_uncaptured = True

        self.optimizer = optimizer
        self.config = config
        self.skip_mode = skip_mode
        self.backend = backend
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
                raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
            if not (0.0 < float(max_grad_norm) < float("inf")):
                raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
            max_grad_norm = float(max_grad_norm)
        self.max_grad_norm = max_grad_norm
        self._grad_norm: torch.Tensor | None = None
        self.energy_group = None  # process group of a hand-sharded (vocab-parallel) lm_head; see dgg_fused.distributed
        self._lm_head = params
        device = params[0].device if params else _first_device(optimizer)
        self._gate = GateState.create(config.window, device)
        self._reuse_index = 1
        self._pending_energy: torch.Tensor | None = None
        self._pending_drift: dict[str, torch.Tensor] = {}
        self._warned_host_path = False
        self._init_host_flag(device)

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
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler hands us grad_scale/found_inf attributes exactly when the inner optimizer would take them.
        return self.skip_mode != "host" and _supports_found_inf(self.optimizer)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending_energy = None
        self._pending_drift = {}
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self._lm_head)
        return f"GatedOptimizer({self.optimizer!r},\n lm_head={len(self._lm_head)} tensor(s), {n} elements,\n {self.config})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

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
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"set_reuse_index expects an int, got {type(k).__name__}")
        if not (1 <= k <= self.config.max_reuse):
            raise ValueError(f"reuse index must be in [1, max_reuse={self.config.max_reuse}], got {k}")
        self._reuse_index = k
        self._gate.reuse_index.fill_(k)
        if k == 1:
            self._gate.stopped.fill_(False)
            self._host_stopped.fill_(False)
            self._stopped_cached = False
            self._stopped_event = None

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
        ev = self._stopped_event
        if ev is not None:
            if block:
                ev.synchronize()
            elif not ev.query():
                return self._stopped_cached
            self._stopped_event = None
        self._stopped_cached = bool(self._host_stopped)
        return self._stopped_cached

    def passes(self, max_reuse: int | None = None, *, block: bool = False) -> Iterator[int]:
        """Iterate the reuse passes of one rollout batch: yields k = 1, 2, ... and stops when the gate trips.

        ``for k in opt.passes(): ...`` is the loop of the README: it calls :meth:`set_reuse_index` for you.
        ``block=True`` waits for each step's decision on CUDA instead of possibly running one wasted pass.
        """
        kmax = self.config.max_reuse if max_reuse is None else max_reuse
        if isinstance(kmax, bool) or not isinstance(kmax, int) or not (1 <= kmax <= self.config.max_reuse):
            raise ValueError(f"passes(max_reuse=...) must be an int in [1, {self.config.max_reuse}], got {kmax!r}")
        for k in range(1, kmax + 1):
            self.set_reuse_index(k)
            if self.poll_reuse_stopped(block=block):
                return
            yield k

    # ------------------------------------------------------------------ energy
    def _lm_head_grads(self) -> list[torch.Tensor]:
        if not self._lm_head:
            raise RuntimeError("GatedOptimizer: this drift-only gate (lm_head=None) has no lm_head energy to measure")
        grads = [p.grad for p in self._lm_head if p.grad is not None]
        if not grads:
            raise RuntimeError(
                "GatedOptimizer.step(): the lm_head parameters have no .grad; run backward() first "
                "(or check that the lm_head is used in the loss)"
            )
        return grads

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
        Returns the 0-d float32 energy (device tensor, no sync). :meth:`zero_grad` discards it.
        """
        if energy is not None:
            if not isinstance(energy, torch.Tensor) or energy.numel() != 1 or not energy.is_floating_point():
                got = f"{tuple(energy.shape)} {energy.dtype}" if isinstance(energy, torch.Tensor) else type(energy).__name__
                raise ValueError(f"record_energy(energy=...) takes a 0-d floating tensor, got {got}")
            e = _unscale(energy.detach().reshape(()).to(torch.float32), grad_scale)
        else:
            e = self._measure_energy(grad_scale)
        self._pending_energy = e
        return e

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
            if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
                got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"record_drift: {name} must be a one-element floating tensor, got {got}")
        self._pending_drift.update({k: v.detach().reshape(()) for k, v in stats.items()})

    def _measure_energy(self, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The one place the lm_head energy is computed: 0-d float32 on the gradients' device, no sync."""
        # DTensor (FSDP2 / TP) shards and energy_group shards are all-reduced; otherwise exactly grad_sumsq.
        e = global_grad_sumsq(self._lm_head_grads(), backend=self.backend, group=self.energy_group)
        return _unscale(e, grad_scale)

    def _measure_energy_partials(self, grad_scale: torch.Tensor | None) -> torch.Tensor | None:
        """The CUDA fast path of :meth:`_measure_energy` for the fused (Triton) gate epilogue: stage-1 partial sums
        of the lm_head energy, which the epilogue kernel adds itself — one launch less per step. None (use
        :meth:`_measure_energy`) without CUDA/Triton, with a GradScaler scale, an energy group or DTensor grads."""
        if grad_scale is not None or self.energy_group is not None or torch.compiler.is_compiling():
            return None
        grads = self._lm_head_grads()
        device = grads[0].device
        if device.type != "cuda" or resolve_epilogue("auto", device) != "triton":
            return None
        return grad_sumsq_partials(grads, backend=self.backend)

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """Total gradient L2 norm (unscaled, before clipping) of the last :meth:`step` with ``max_grad_norm``; 0-d
        float32 device tensor (what ``clip_grad_norm_`` returns), or None."""
        return self._grad_norm

    def _clip_grads_(self, lm_energy: torch.Tensor, grad_scale: torch.Tensor | None, fresh: bool) -> None:
        """Total-norm clipping sharing the gate's pass: the lm_head part of the total is the gate's energy (the
        other gradients are read once here), then one on-device multiply by the clamped coefficient."""
        lm_ids = {id(p) for p in self._lm_head}
        seen: set[int] = set()
        rest: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) in seen:
                    continue
                seen.add(id(p))
                grads.append(p.grad)
                if id(p) not in lm_ids:
                    rest.append(p.grad)
        if lm_energy is None:  # a drift-only gate: no lm_head singled out, every gradient is in `rest`
            lm_energy = torch.zeros((), dtype=torch.float32, device=self._gate.skip.device)
        elif not fresh:  # the energy was recorded earlier (record_energy): the gradients may have changed since
            lm_energy = self._measure_energy(grad_scale)
        if lm_energy.dim() > 0:  # stage-1 partials (_measure_energy_partials): add them as the epilogue does
            lm_energy = lm_energy.sum(dtype=torch.float64)
        total = lm_energy.to(torch.float32)
        if rest:
            r = _unscale(global_grad_sumsq(rest, backend=self.backend), grad_scale)
            total = total + r.to(total.device)
        norm = total.sqrt()
        coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for device, dgrads in _by_device(grads).items():
            torch._foreach_mul_(dgrads, coef.to(device))
        self._grad_norm = norm

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Measure the lm_head energy, update the gate and apply (or exactly skip) the inner step.

        No host sync on the sync-free path (see the class docstring). The closure, if any, is evaluated once here
        (under ``torch.enable_grad``) and the inner optimizer is stepped without it.
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

        scaler_scale = getattr(self, "grad_scale", None)  # set by GradScaler when grads are still scaled
        scaler_inf = getattr(self, "found_inf", None)
        drift = None
        if self.config.drift is not None:
            drift = self._pending_drift.get(self.config.drift)
            if drift is None:
                raise RuntimeError(
                    f"GatedOptimizer.step(): the gate watches {self.config.drift!r} but this step has none; call "
                    f"opt.record_drift({self.config.drift}=...) before step() (see dgg_fused.drift_stats)"
                )
        energy = None
        if self.config.energy:
            if self._pending_energy is not None:
                energy = self._pending_energy
            else:
                energy = self._measure_energy_partials(scaler_scale)  # CUDA + Triton: 2 launches per gated step
                if energy is None:
                    energy = self._measure_energy(scaler_scale)
        if self.max_grad_norm is not None:  # after the gate's measurement: the gate sees pre-clip gradients
            self._clip_grads_(energy, scaler_scale, fresh=self._pending_energy is None)
        self._pending_energy = None
        self._pending_drift = {}
        device = energy.device if energy is not None else self._gate.skip.device
        if device != self._gate.skip.device:
            self._gate.to(device)
            self._init_host_flag(device)

        external = None
        if scaler_inf is not None:  # an overflowed step is the scaler's to drop: the gate ignores it
            external = scaler_inf.to(device=device, dtype=torch.float32).clamp(0.0, 1.0)
        skip = gate_step_(self._gate, energy, self.config, external_skip=external, drift=drift)

        run_inner = True
        if self._use_found_inf():
            found_inf = skip if external is None else torch.maximum(skip, external)
        else:
            self._warn_host_path()
            if self._reuse_index > 1:  # on k == 1 the gate cannot trip: no sync needed
                run_inner = not bool(skip)  # the one host sync of the fallback path
            found_inf = scaler_inf
        if run_inner:
            self._step_inner(found_inf, scaler_scale)
        self._publish_stopped()

        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, args, kwargs)
        return loss

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
        inner = self.optimizer
        if isinstance(inner, torch.optim.SGD):
            for g in inner.param_groups:
                if g.get("momentum", 0) != 0:
                    for p in g["params"]:
                        if p.grad is not None and inner.state.get(p, {}).get("momentum_buffer") is None:
                            return False
        return True

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

    def _init_host_flag(self, device: torch.device) -> None:
        pin = device.type == "cuda" and torch.cuda.is_available()
        self._host_stopped = torch.zeros((), dtype=torch.bool, pin_memory=pin)
        self._stopped_event = None
        self._stopped_cached = False

    def _publish_stopped(self) -> None:
        src = self._gate.stopped
        if src.device.type == "cuda":
            self._host_stopped.copy_(src, non_blocking=True)
            if torch.cuda.is_current_stream_capturing():
                # An event recorded inside a CUDA-graph capture cannot be queried afterwards. The copy itself is
                # captured and lands at each replay; reuse_stopped then reads the host buffer as it is (a late
                # answer is safe: steps of a stopped batch are dropped on the device anyway).
                self._stopped_event = None
            else:
                ev = torch.cuda.Event()
                ev.record()
                self._stopped_event = ev
        else:  # CPU: a plain copy costs nothing; other accelerators: a synchronising copy (no event API here)
            self._host_stopped.copy_(src)

    # ------------------------------------------------------------------ metrics
    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Gate metrics of the last step as 0-d device tensors (views of live state: clone to keep them).

        Keys: ``energy`` (lm_head gradient energy), ``statistic`` (the Z-score compared with tau), ``gated``
        (1.0 if this step tripped the gate), ``skipped`` (1.0 if this step was dropped: tripped, or on a stopped
        batch), ``steps``, ``gated_steps`` (dropped steps), ``stopped_batches`` (trips), ``reuse_index``, ``drift``
        and ``drift_statistic`` (with ``config.drift`` set only: the watched drift statistic's value, and what its
        rule compared — the value itself, or its Z-score).
        """
        g = self._gate
        out = {
            "energy": g.last[0],
            "statistic": g.last[1],
            "gated": g.last[2],
            "skipped": g.last[3],
            "steps": g.counters[CNT_STEPS],
            "gated_steps": g.counters[CNT_GATED_STEPS],
            "stopped_batches": g.counters[CNT_STOPPED_BATCHES],
            "reuse_index": g.reuse_index,
        }
        if self.config.drift is not None:
            out["drift"] = g.drift_last[0]
            out["drift_statistic"] = g.drift_last[1]
        return out

    def get_metrics(self) -> dict[str, float | int]:
        """:attr:`metrics` as Python numbers for a logger. This is the one call that syncs: do it when logging."""
        g = self._gate
        packed = torch.cat(
            [g.last.double(), g.counters.double(), g.reuse_index.reshape(1).double(), g.drift_last.double()]
        ).cpu().tolist()
        e, s, gated, skipped, steps, gsteps, sbatches, k, d, ds = packed
        out = {
            "energy": e,
            "statistic": s,
            "gated": gated,
            "skipped": skipped,
            "steps": int(steps),
            "gated_steps": int(gsteps),
            "stopped_batches": int(sbatches),
            "reuse_index": int(k),
        }
        if self.config.drift is not None:
            out["drift"] = d
            out["drift_statistic"] = ds
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's ``state_dict()`` plus the gate's state under the ``"dgg"`` key."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = dict(self.optimizer.state_dict())
        sd[_STATE_KEY] = {
            "format": _FORMAT,
            "config": self.config.to_dict(),
            "reuse_index": self._reuse_index,
            "gate": self._gate.state_dict(),
        }
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
        dgg = sd.pop(_STATE_KEY, None)
        scratch = None
        if dgg is not None:
            if not isinstance(dgg, dict) or dgg.get("format") != _FORMAT:
                raise ValueError(f"state_dict['{_STATE_KEY}'] is not a dgg_fused gate state of format {_FORMAT}")
            saved_cfg = GateConfig.from_dict(dgg["config"])
            if saved_cfg.window != self.config.window:
                raise ValueError(
                    f"checkpoint gate window is {saved_cfg.window}, this optimizer's is {self.config.window}"
                )
            if saved_cfg != self.config:
                warnings.warn(f"loading gate state written with {saved_cfg}; keeping the current {self.config}")
            k = dgg["reuse_index"]
            if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= self.config.max_reuse):
                raise ValueError(f"checkpoint reuse_index {k!r} is outside [1, {self.config.max_reuse}]")
            scratch = GateState.create(self.config.window, self._gate.skip.device)
            scratch.load_state_dict(dgg["gate"])  # validates shapes and dtypes
        self.optimizer.load_state_dict(sd)
        if scratch is not None:
            self._gate.load_state_dict(scratch.tensors())
            self._reuse_index = dgg["reuse_index"]
            self._init_host_flag(self._gate.skip.device)
            self._publish_stopped()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


# The hooks are run by GatedOptimizer.step itself (around the whole gated step); tell torch not to wrap it again,
# which would also run torch's *global* optimizer hooks twice (once here, once for the inner optimizer).
GatedOptimizer.step.hooked = True  # type: ignore[attr-defined]


def _unscale(energy: torch.Tensor, grad_scale: torch.Tensor | None) -> torch.Tensor:
    """A sum of squares of GradScaler-scaled gradients, divided back by ``grad_scale**2`` (on the device)."""
    if grad_scale is None:
        return energy
    return energy / grad_scale.to(device=energy.device, dtype=torch.float32).square()


def _first_device(optimizer: torch.optim.Optimizer) -> torch.device:
    for g in optimizer.param_groups:
        for p in g["params"]:
            return p.device
    return torch.device("cpu")


def _by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    out: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault(t.device, []).append(t)
    return out


def _supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours ``found_inf``/``grad_scale`` attributes (torch's fused optimizers)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    # Every group must be fused: torch's non-fused code paths reject found_inf.
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)):
        return all(bool(g.get("fused")) for g in optimizer.param_groups)
    return False
