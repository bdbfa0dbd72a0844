"""The lm_head gradient energy of a step, and the clip that shares its read.

:class:`EnergyMeter` owns everything between "the gradients exist" and "the gate gets a number", on the path the
optimizer's :class:`~dgg_fused.plan.Plan` fixed at construction:

* **The measurement** (:meth:`EnergyMeter.measure`): the plan's kernel over the lm_head gradients, as Triton stage-1
  *partial sums* when the plan says so (the gate's fused epilogue adds them: two launches per gated step), or as a
  0-d tensor; the global reduction of :mod:`dgg_fused.distributed` when the plan says the energy is global. A
  GradScaler's scale is carried along (:class:`Energy`): the gate divides by ``scale**2`` itself.
* **A recorded energy** (:meth:`record`): measured earlier (e.g. before ``clip_grad_norm_``), used at the next step
  unless the gradients it was measured on are gone (``model.zero_grad()``, a step skipped elsewhere): then the step
  measures again instead of judging a stale value.
* **The energy hook** (:meth:`attach_hook`, ``GatedOptimizer(energy_hook=True)``): post-accumulate-grad hooks on the
  lm_head parameters measure the energy during backward, as soon as the last lm_head gradient of that backward is
  accumulated (on CUDA on a side stream), so the read overlaps the rest of backward. The step uses that measurement
  only if every lm_head gradient is still the tensor it read, unchanged since (same ``Tensor._version``); else it
  measures again. Writes that bypass the version counter (``p.grad.data.mul_(...)``) are not seen: call
  :meth:`~dgg_fused.GatedOptimizer.record_energy` after them (docs/design.md).
* **Clipping and its fold** (:meth:`for_step`, :meth:`clip_`): total-norm clipping that reuses the lm_head energy,
  the other gradients read once; the clip coefficient is either applied to the gradients or folded into a fused
  optimizer's ``grad_scale``.

The clip's gradient lists are cached per parameter set (``_ClipPlan``): rebuilt when the parameter groups change or
a gradient appears or disappears; gradients reallocated by ``zero_grad(set_to_none=True)`` are re-read each step.
Under ``torch.compile`` nothing is cached: the traced code builds its lists itself.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import torch

from .distributed import global_grad_sumsq, is_dtensor
from .gate.reference import energy_from
from .ops import kernel, resolve_backend
from .plan import Plan

__all__ = ["Energy", "EnergyMeter", "StepEnergy"]


@dataclass(frozen=True)
class Energy:
    """One step's lm_head energy as the gate receives it.

    Attributes:
        value: 0-d float32 energy, or a 1-D float32 tensor of partial sums (their float64 sum, rounded once, is the
            energy).
        grad_scale: a GradScaler's scale when the gradients were still scaled (the energy is then
            ``value / grad_scale**2``), else None.
    """

    value: torch.Tensor
    grad_scale: torch.Tensor | None = None

    def total(self) -> torch.Tensor:
        """The unscaled 0-d float32 energy (what the gate compares; added partials, divided by ``scale**2``)."""
        return energy_from(self.value, self.grad_scale)


class StepEnergy(NamedTuple):
    """What :meth:`EnergyMeter.for_step` measured for one step: the gate's ``energy`` (None for a rule that reads
    none), the pre-clip total gradient norm ``grad_norm`` (None without ``max_grad_norm``) and the ``grad_scale``
    for the inner step (the GradScaler's, or the folded clip coefficient; None for none)."""

    energy: Energy | None
    grad_norm: torch.Tensor | None
    inner_scale: torch.Tensor | None


class EnergyMeter:
    """Measures the energy of ``params``' gradients (the lm_head) for a :class:`~dgg_fused.GatedOptimizer`.

    Args:
        params: the lm_head parameters (one device); empty for a gate without an lm_head (the clip reads every
            gradient then).
        plan: the optimizer's plan (kernel, partial sums, global reduction); replaced by :meth:`set_plan`.
        group: process group over which plain (non-DTensor) lm_head gradients are partitioned, or None.
    """

    def __init__(self, params: Sequence[torch.Tensor], plan: Plan, *, group: Any = None) -> None:
        self.params = list(params)
        self.plan = plan
        self.group = group
        self._pending: _Recording | None = None
        self._clip_plan: _ClipPlan | None = None
        self._hook: _EnergyHook | None = None
        self._hook_wanted = False
        self._hook_warned: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # A copy starts without a recorded energy (tied by weak references to these gradients), without a cached
        # clip plan (rebuilt on first use) and without hooks: it installs its own on its own parameters.
        return {**self.__dict__, "_pending": None, "_clip_plan": None, "_hook": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._hook_wanted:
            self.attach_hook()

    def set_plan(self, plan: Plan, group: Any = None) -> None:
        """Use a new plan (the energy group changed, or the lm_head moved)."""
        self.plan, self.group = plan, group
        self._clip_plan = None

    def grads(self) -> list[torch.Tensor]:
        """The lm_head gradients present now (RuntimeError when there are none)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError(
                "GatedOptimizer.step(): the lm_head parameters have no .grad; run backward() first "
                "(or check that the lm_head is used in the loss)"
            )
        return grads

    # ------------------------------------------------------------------ measuring
    @torch.no_grad()
    def measure(self, grad_scale: torch.Tensor | None = None, *, partials: bool = True) -> Energy:
        """The energy of the current lm_head gradients (no host sync). ``partials=False`` forces a 0-d value."""
        grads = self.grads()
        plan = self.plan
        if torch.compiler.is_compiling():  # the traced path: no look-ups, the planned op directly
            return Energy(kernel(plan.energy_backend)(grads), grad_scale)
        if plan.global_energy:
            return Energy(global_grad_sumsq(grads, backend=plan.backend, group=self.group), grad_scale)
        for g in grads:
            if g.layout != torch.strided:
                raise TypeError(f"the lm_head gradient is {g.layout}: the energy needs dense (strided) gradients")
        name = plan.energy_backend
        if grads[0].device != plan.device or any(g.dtype not in plan.energy_dtypes for g in grads):
            # the lm_head moved (the optimizer follows it after this measurement), or gradients of another dtype
            # than their parameters (assigned by hand): the resolver picks for these gradients
            name = resolve_backend(plan.backend, grads[0].device, tuple(g.dtype for g in grads))
        if partials and plan.partials and name == "triton":
            return Energy(kernel(name, partials=True)(grads), grad_scale)
        return Energy(kernel(name)(grads), grad_scale)

    # ------------------------------------------------------------------ a recorded energy
    def record(self, energy: Energy) -> None:
        """Keep ``energy`` for the next step, tied to the gradient tensors present now."""
        self._pending = _Recording(energy, self._grad_refs())

    def _grad_refs(self) -> tuple:
        return tuple(weakref.ref(p.grad) if p.grad is not None else None for p in self.params)

    def discard(self) -> None:
        self._pending = None

    @property
    def pending(self) -> "_Recording | None":
        """The measurement the next step would consider (recorded, or made by the hook), or None."""
        return self._pending

    def take(
        self, grad_scale: torch.Tensor | None = None, *, scaler_unscaled: bool = False
    ) -> tuple[Energy | None, bool]:
        """The pending measurement for this step, as ``(energy, current)``; clears it either way.

        A :meth:`record`-ed energy is returned as recorded if the lm_head gradients are still the tensors it was
        measured on, with ``current=False`` (it may predate changes of the gradient values, e.g. by a clip). A hook
        measurement (:meth:`attach_hook`) is returned only if the gradients are the same tensors *with the same
        values* (``Tensor._version`` unchanged) and ``scaler_unscaled`` is false (a GradScaler that unscaled the
        gradients in place does not bump their versions); it then carries ``grad_scale`` (the hook measured the
        gradients as backward left them) and ``current=True``: it is exactly what :meth:`measure` would return
        now. On CUDA the current stream is made to wait for the side stream's read (no host sync).
        """
        rec = self._pending
        self._pending = None
        if rec is None:
            return None, False
        for p, r in zip(self.params, rec.refs):
            if (r() if r is not None else None) is not p.grad:
                return None, False
        if rec.versions is None:
            return rec.energy, False
        if scaler_unscaled:
            return None, False
        for p, v in zip(self.params, rec.versions):
            if p.grad is not None and p.grad._version != v:
                return None, False
        value = rec.energy.value
        if rec.event is not None:
            stream = torch.cuda.current_stream(value.device)
            stream.wait_event(rec.event)
            value.record_stream(stream)
        return Energy(value, grad_scale), True

    # ------------------------------------------------------------------ one step's measurements
    @torch.no_grad()
    def for_step(
        self,
        *,
        given: Energy | None,
        need_energy: bool,
        scaler_scale: torch.Tensor | None,
        scaler_unscaled: bool,
        param_groups: list[dict[str, Any]],
        max_grad_norm: float | None,
        fold: bool,
    ) -> StepEnergy:
        """Everything one step measures, each gradient read once.

        The gate's energy (``need_energy``): ``given`` (an energy measured elsewhere, used as is), else the pending
        measurement (:meth:`take`), else :meth:`measure`. With ``max_grad_norm``: the total-norm clip
        (:meth:`clip_`), which reuses the energy when it is current (a recorded one may predate changes such as an
        unscaling: the lm_head is measured afresh then). ``fold``: instead of scaling the gradients, hand the clip
        coefficient to a fused inner step as ``grad_scale = scaler_scale / coef`` (``1 / coef`` without a scaler):
        the kernel divides every gradient by it, one pass over the gradients less (equal to clipping up to rounding;
        docs/design.md).
        """
        if given is not None:
            self._pending = None
            recorded, current = given, False
        else:
            recorded, current = self.take(scaler_scale, scaler_unscaled=scaler_unscaled)
        energy = None
        if need_energy:
            if recorded is None:
                recorded, current = self.measure(scaler_scale), True
            energy = recorded
        if max_grad_norm is None:
            return StepEnergy(energy, None, scaler_scale)
        if not self.params:  # no lm_head singled out: the clip reads every gradient as "the rest"
            lm = torch.zeros((), dtype=torch.float32, device=self.plan.device)
        elif energy is not None and current:
            lm = energy.total()
        else:
            lm = self.measure(scaler_scale, partials=False).total()
        norm, coef = self.clip_(lm, param_groups, max_grad_norm, scaler_scale, apply=not fold)
        inner_scale = scaler_scale
        if fold:  # the fused kernel divides every gradient by grad_scale: dividing by 1/coef is the clip
            inner_scale = (1.0 / coef) if scaler_scale is None else scaler_scale.to(coef.device) / coef
        return StepEnergy(energy, norm, inner_scale)

    # ------------------------------------------------------------------ the energy hook
    @property
    def hooked(self) -> bool:
        """Whether the post-accumulate-grad hooks are installed (:meth:`attach_hook`)."""
        return self._hook is not None

    def attach_hook(self) -> None:
        """Install post-accumulate-grad hooks on the lm_head parameters that measure the energy during backward.

        The energy is measured once per backward, when the last lm_head parameter that this backward reaches has
        its gradient accumulated (``torch._C._will_engine_execute_node`` tells which ones it reaches), over all the
        lm_head gradients present (the same list :meth:`measure` reads, so the same bits). On CUDA the read runs on
        a side stream that first waits for the current (backward) stream; the gradients are marked used by the side
        stream (``record_stream``) and an event is recorded for :meth:`take`. The hooks hold only a weak
        reference to this meter and are removed when it is garbage collected (or by :meth:`detach_hook`).
        The hooks do not measure inside :meth:`pause_hook`; nor (a one-time warning gives the reason) for DTensor
        gradients, with an energy group, in a multi-process run (DDP/FSDP may still reduce the gradient in place
        after it is accumulated), during a CUDA graph capture or under compiled autograd: the step measures then.
        """
        self._hook_wanted = True
        if self._hook is None and self.params:
            self._hook = _EnergyHook(self)

    def detach_hook(self) -> None:
        """Remove the hooks of :meth:`attach_hook` (and forget a measurement they made)."""
        self._hook_wanted = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._pending is not None and self._pending.versions is not None:
            self._pending = None

    @contextlib.contextmanager
    def pause_hook(self) -> Iterator[None]:
        """Backward passes inside do not measure (non-final micro-batches of gradient accumulation)."""
        h = self._hook
        if h is None:
            yield
            return
        h.paused += 1
        try:
            yield
        finally:
            h.paused -= 1

    def _hook_skip_reason(self, grads: list[torch.Tensor]) -> str | None:
        if torch.compiler.is_compiling():
            return "the backward runs under torch.compile (compiled autograd)"
        if self.plan.global_energy:
            return ("the energy is a global reduction (an energy group or DTensor gradients): a collective issued "
                    "from inside backward could interleave with the gradient collectives in a different order on "
                    "each rank")
        if any(g.layout != torch.strided for g in grads):
            return "the lm_head gradient is not dense"
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return ("this is a multi-process run: DDP/FSDP may reduce the lm_head gradient in place after it is "
                    "accumulated, unseen by the hook")
        if grads[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return "a CUDA graph is being captured"
        return None

    @torch.no_grad()
    def _measure_in_hook(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        reason = self._hook_skip_reason(grads)
        if reason is not None:
            self._pending = None
            if reason not in self._hook_warned:
                self._hook_warned.add(reason)
                warnings.warn(f"energy_hook: the lm_head energy is measured in step() instead, because {reason}",
                              stacklevel=2)
            return
        device = grads[0].device
        event = None
        if device.type == "cuda":
            current = torch.cuda.current_stream(device)
            side = self._hook.side_stream(device)
            side.wait_stream(current)  # the read follows the accumulation
            with torch.cuda.stream(side):
                energy = self.measure()
            for g in grads:
                g.record_stream(side)  # freed gradients are not reused while the side stream reads them
            event = torch.cuda.Event()
            event.record(side)
        else:
            energy = self.measure()
        self._pending = _Recording(
            energy, self._grad_refs(), tuple(p.grad._version if p.grad is not None else None for p in self.params),
            event,
        )

    # ------------------------------------------------------------------ clipping
    @torch.no_grad()
    def clip_(
        self, lm_energy: torch.Tensor, param_groups: list[dict[str, Any]], max_norm: float,
        grad_scale: torch.Tensor | None, *, apply: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale every gradient of ``param_groups`` by ``coef = min(1, max_norm / (norm + 1e-6))`` on the device,
        where ``norm`` is the total (unscaled) L2 norm: ``lm_energy`` (0-d, unscaled) for the lm_head plus one read of
        the other gradients (sparse ones too, like ``clip_grad_norm_``). Returns ``(norm, coef)`` (0-d float32).
        ``apply=False`` leaves the gradients as they are (the caller folds ``coef`` into a fused optimizer's
        ``grad_scale``)."""
        if torch.compiler.is_compiling():
            plan = _ClipPlan.build(param_groups, self.params, self.plan.backend)
        else:
            plan = self._clip_plan
            if plan is None or not plan.valid_for(param_groups):
                plan = self._clip_plan = _ClipPlan.build(param_groups, self.params, self.plan.backend)
        grads = plan.grads()
        if grads is None:  # a gradient appeared or disappeared since the plan: rebuild it once
            plan = self._clip_plan = _ClipPlan.build(param_groups, self.params, self.plan.backend)
            grads = plan.grads()
        total = lm_energy.to(torch.float32)
        rest = plan.rest_sumsq(grads)
        if rest is not None:
            total = total + energy_from(rest, grad_scale).to(total.device)
        norm = total.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        if apply:
            plan.scale_(grads, coef)
        return norm, coef


@dataclass
class _Recording:
    """An energy kept for the next step: by :meth:`EnergyMeter.record` (``versions`` None), or by the energy hook
    (``versions``: the gradients' ``_version`` when it read them; ``event``: the side stream's read on CUDA)."""

    energy: Energy
    refs: tuple
    versions: tuple | None = None
    event: Any = None


def _on_accumulated(meter_ref: "weakref.ReferenceType[EnergyMeter]", index: int, param: torch.Tensor) -> None:
    """The post-accumulate-grad hook of lm_head parameter ``index`` (module level: it holds the meter weakly)."""
    meter = meter_ref()
    if meter is not None and meter._hook is not None:
        meter._hook.fired(meter, index)


def _remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()


class _EnergyHook:
    """The hooks of :meth:`EnergyMeter.attach_hook` and their per-backward bookkeeping."""

    def __init__(self, meter: EnergyMeter) -> None:
        from torch.autograd.graph import _get_grad_fn_or_grad_acc

        params = meter.params
        # Several lm_head tensors (weight and bias): measure once, after the last one this backward reaches. Their
        # gradient accumulators are held (as torch's register_multi_grad_hook does) so the engine can be asked.
        self.nodes = [_get_grad_fn_or_grad_acc(p) for p in params] if len(params) > 1 else None
        self.task = -1
        self.expected: set[int] = set()
        self.seen: set[int] = set()
        self.paused = 0
        self.streams: dict[torch.device, Any] = {}
        ref = weakref.ref(meter)
        handles = [
            p.register_post_accumulate_grad_hook(functools.partial(_on_accumulated, ref, i)) for i, p in enumerate(params)
        ]
        self._finalizer = weakref.finalize(meter, _remove_handles, handles)

    def remove(self) -> None:
        self._finalizer()

    def side_stream(self, device: torch.device) -> Any:
        s = self.streams.get(device)
        if s is None:
            s = self.streams[device] = torch.cuda.Stream(device)
        return s

    def fired(self, meter: EnergyMeter, index: int) -> None:
        if self.nodes is not None:
            task = torch._C._current_graph_task_id()
            if task != self.task:
                self.task = task
                self.seen = set()
                self.expected = {i for i, n in enumerate(self.nodes) if torch._C._will_engine_execute_node(n)}
            self.seen.add(index)
            if not self.seen >= self.expected:
                return
            self.task = -1
        if self.paused:
            return  # a non-final micro-batch: the next accumulation makes any earlier measurement stale anyway
        meter._measure_in_hook()


class _ClipPlan:
    """Which gradients a clip reads and scales, grouped once per parameter set."""

    def __init__(self, key, params, without, rest_idx, backend) -> None:
        self.key = key
        self.params = params  # every parameter with a gradient, deduplicated, in group order
        self.without = without  # the parameters without one (still None at each step, or the plan is stale)
        self.rest_idx = rest_idx  # indices (into params) of the non-lm_head gradients
        self.backend = backend
        rest = [params[i].grad for i in rest_idx]
        # DTensor gradients: the global reduction of dgg_fused.distributed (its own checks, every step)
        self.global_path = any(is_dtensor(g) for g in rest)
        # Otherwise: per device, the dense gradients' indices and their resolved kernel; the sparse ones apart.
        self.sparse_idx = [i for i in rest_idx if params[i].grad.layout != torch.strided]
        dense: dict[torch.device, list[int]] = {}
        for i in rest_idx:
            if params[i].grad.layout == torch.strided:
                dense.setdefault(params[i].grad.device, []).append(i)
        self.dense = [
            (idx, kernel(resolve_backend(backend, dev, tuple({params[i].grad.dtype for i in idx}))))
            for dev, idx in dense.items()
        ]
        self.layout_key = [params[i].grad.layout for i in rest_idx]

    @staticmethod
    def key_of(param_groups: list[dict[str, Any]]) -> tuple:
        return (id(param_groups), tuple((id(g["params"]), len(g["params"])) for g in param_groups))

    @classmethod
    def build(cls, param_groups, lm_params, backend) -> "_ClipPlan":
        lm_ids = {id(p) for p in lm_params}
        seen: set[int] = set()
        params, without, rest_idx = [], [], []
        for group in param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if p.grad is None:
                    without.append(p)
                    continue
                if id(p) not in lm_ids:
                    rest_idx.append(len(params))
                params.append(p)
        return cls(cls.key_of(param_groups), params, without, rest_idx, backend)

    def valid_for(self, param_groups) -> bool:
        return self.key == self.key_of(param_groups)

    def grads(self) -> list[torch.Tensor] | None:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads) or any(p.grad is not None for p in self.without):
            return None
        if any(grads[i].layout != lay for i, lay in zip(self.rest_idx, self.layout_key)):
            return None
        return grads

    def rest_sumsq(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        if not self.rest_idx:
            return None
        if self.global_path:
            return global_grad_sumsq([grads[i] for i in self.rest_idx], backend=self.backend)
        parts = [fn([grads[i] for i in idx]) for idx, fn in self.dense]
        for i in self.sparse_idx:  # sparse: duplicate indices add up first, as in the dense gradient
            v = grads[i].coalesce().values()
            parts.append(v.double().square().sum().to(torch.float32))
        total = parts[0]
        for p in parts[1:]:
            total = total + (p if p.device == total.device else p.to(total.device))
        return total

    @staticmethod
    def scale_(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            if g.layout == torch.strided:
                by_device.setdefault(g.device, []).append(g)
            else:
                g.mul_(coef if coef.device == g.device else coef.to(g.device))
        for device, ds in by_device.items():
            torch._foreach_mul_(ds, coef if coef.device == device else coef.to(device))
