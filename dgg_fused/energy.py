"""The lm_head gradient energy of a step: measured once, on the path decided once.

:class:`EnergyMeter` owns everything between "the gradients exist" and "the gate gets a number":

* **The path**, decided at construction (:meth:`EnergyMeter.__init__`: a bad or unavailable ``backend=`` raises
  there, before any rollout is paid for) and kept per parameter set: the resolved backend (``dgg_fused.ops``), and
  whether the energy is handed to the gate as Triton stage-1 *partial sums* (CUDA + Triton: the gate's fused
  epilogue adds them, two launches per gated step) or as a 0-d tensor. DTensor gradients and an energy group take
  the global reduction of :mod:`dgg_fused.distributed`.
* **The measurement** (:meth:`measure`), with a GradScaler's scale carried along (:class:`Energy`): the gate
  divides by ``scale**2`` itself (the fused epilogue in the same launch).
* **A recorded energy** (:meth:`record`): measured earlier (e.g. before ``clip_grad_norm_``), used at the next step
  unless the gradients it was measured on are gone (``model.zero_grad()``, a step skipped elsewhere): then the step
  measures again instead of judging a stale value.
* **Clipping** (:meth:`clip_`): total-norm clipping that reuses the lm_head energy, the other gradients read once.

The eager path caches the plan per parameter set (the lm_head / all-parameter lists, the resolved backend, the
device grouping), so a step costs the kernel calls plus a list of ``p.grad`` reads. The plan is rebuilt when the
parameter groups change or a gradient appears or disappears; gradients reallocated by ``zero_grad(set_to_none=True)``
are simply re-read each step. Under ``torch.compile`` nothing is cached: the traced code builds its lists itself.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .distributed import global_grad_sumsq, is_dtensor
from .gate.reference import energy_from
from .ops import grad_sumsq_partials, kernel, resolve_backend

__all__ = ["Energy", "EnergyMeter"]


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


class EnergyMeter:
    """Measures the energy of ``params``' gradients (the lm_head) for a :class:`~dgg_fused.GatedOptimizer`.

    Args:
        params: the lm_head parameters (one device).
        backend: ``"auto"`` or a name of :data:`dgg_fused.ops.BACKENDS`; resolved here (``ValueError`` for an
            unknown name, ``RuntimeError`` for one unavailable on the parameters' device).
        group: process group over which plain (non-DTensor) lm_head gradients are partitioned, or None.
    """

    def __init__(self, params: Sequence[torch.Tensor], *, backend: str = "auto", group: Any = None) -> None:
        if not isinstance(backend, str):
            raise ValueError(f"backend must be a string, got {type(backend).__name__}")
        self.params = list(params)
        self.backend = backend
        self.group = group
        self._pending: Energy | None = None
        self._pending_refs: tuple = ()
        self._clip_plan: _ClipPlan | None = None
        if self.params:
            self._plan_for(self.params[0].device, tuple(p.dtype for p in self.params))

    @classmethod
    def for_clip(cls, *, backend: str = "auto") -> "EnergyMeter":
        """A meter with no lm_head, for clipping only (a drift-only gate)."""
        return cls([], backend=backend)

    # ------------------------------------------------------------------ the path, decided once per parameter set
    def _plan_for(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str:
        name = resolve_backend(self.backend, device, dtypes)
        self._device, self._dtypes, self._name = device, dtypes, name
        return name

    @property
    def resolved_backend(self) -> str:
        """The backend the lm_head energy is computed with (``backend="auto"`` resolved)."""
        return self._name

    def set_group(self, group: Any) -> None:
        self.group = group
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
        if torch.compiler.is_compiling():  # the traced path: no cache look-ups, the resolved op directly
            return Energy(kernel(self._name)(grads), grad_scale)
        if self.group is not None or any(is_dtensor(g) for g in grads):
            return Energy(global_grad_sumsq(grads, backend=self.backend, group=self.group), grad_scale)
        for g in grads:
            if g.layout != torch.strided:
                raise TypeError(f"the lm_head gradient is {g.layout}: the energy needs dense (strided) gradients")
        dtypes = tuple(g.dtype for g in grads)
        device = grads[0].device
        name = self._name if (device == self._device and dtypes == self._dtypes) else self._plan_for(device, dtypes)
        if partials and name == "triton":
            p = grad_sumsq_partials(grads, backend=name)
            if p is not None:
                return Energy(p, grad_scale)
        return Energy(kernel(name)(grads), grad_scale)

    # ------------------------------------------------------------------ a recorded energy
    def record(self, energy: Energy) -> None:
        """Keep ``energy`` for the next :meth:`take`, tied to the gradient tensors present now."""
        self._pending = energy
        self._pending_refs = tuple(weakref.ref(p.grad) if p.grad is not None else None for p in self.params)

    def discard(self) -> None:
        self._pending = None
        self._pending_refs = ()

    def take(self) -> Energy | None:
        """The recorded energy if the lm_head gradients are still the tensors it was measured on, else None (a
        stale recording is dropped). Clears it either way."""
        e, refs = self._pending, self._pending_refs
        self.discard()
        if e is None:
            return None
        for p, r in zip(self.params, refs):
            if (r() if r is not None else None) is not p.grad:
                return None
        return e

    # ------------------------------------------------------------------ clipping
    @torch.no_grad()
    def clip_(
        self, lm_energy: torch.Tensor, param_groups: list[dict[str, Any]], max_norm: float,
        grad_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """Scale every gradient of ``param_groups`` by ``min(1, max_norm / (norm + 1e-6))`` on the device, where
        ``norm`` is the total (unscaled) L2 norm: ``lm_energy`` (0-d, unscaled) for the lm_head plus one read of the
        other gradients (sparse ones too, like ``clip_grad_norm_``). Returns the norm (0-d float32)."""
        if torch.compiler.is_compiling():
            plan = _ClipPlan.build(param_groups, self.params, self.backend)
        else:
            plan = self._clip_plan
            if plan is None or not plan.valid_for(param_groups):
                plan = self._clip_plan = _ClipPlan.build(param_groups, self.params, self.backend)
        grads = plan.grads()
        if grads is None:  # a gradient appeared or disappeared since the plan: rebuild it once
            plan = self._clip_plan = _ClipPlan.build(param_groups, self.params, self.backend)
            grads = plan.grads()
        total = lm_energy.to(torch.float32)
        rest = plan.rest_sumsq(grads)
        if rest is not None:
            total = total + energy_from(rest, grad_scale).to(total.device)
        norm = total.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        plan.scale_(grads, coef)
        return norm


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
