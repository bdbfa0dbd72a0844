"""The plan of a :class:`~dgg_fused.GatedOptimizer`: every choice of its step, resolved once, at construction.

torch.optim resolves ``foreach`` / ``fused`` once (``_default_to_fused_or_foreach``); Liger keeps one device ->
implementation table. Here :func:`make_plan` asks the one resolver, :func:`dgg_fused.ops.resolve_backend` (over the
one preference table, ``ops.AUTO_ORDER``), and freezes the answers in a :class:`Plan`: the energy kernel, partial
sums or a scalar, a global reduction or a local one, the gate implementation, the skip path. Every later question
asks the plan. It is made again only when one of its inputs changes: ``add_param_group`` (the skip path), the energy
group, the lm_head moving to another device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import GateConfig
from .distributed import is_dtensor
from .gate import impl_for
from .ops import resolve_backend
from .skip import supports_found_inf

__all__ = ["Plan", "make_plan", "check_clip_backend", "SKIP_MODES"]

#: ``"auto"``: the sync-free ``found_inf`` path when the inner optimizer supports it, else the host path.
#: ``"found_inf"``: require the sync-free path (``ValueError`` at construction if unsupported).
#: ``"host"``: always decide on the host (one sync per reuse-pass step); works with any optimizer.
SKIP_MODES = ("auto", "found_inf", "host")


@dataclass(frozen=True)
class Plan:
    """How every step of one :class:`~dgg_fused.GatedOptimizer` runs (read it as ``opt.plan``).

    Attributes:
        device: where the gate state lives: the lm_head's device (a drift-only gate: the first parameter's).
        backend: ``backend=`` as given (``"auto"`` or a name); the clip resolves it for the other gradients' devices.
        energy_backend: the kernel of the lm_head energy, resolved for the lm_head's device and dtypes (None: the
            gate has no lm_head).
        energy_dtypes: the lm_head dtypes ``energy_backend`` was resolved for.
        partials: the energy reaches the gate as Triton stage-1 partial sums, which the gate's epilogue adds
            (two launches per gated step).
        global_energy: the energy is a global reduction (DTensor lm_head parameters, or an energy group).
        gate_impl: the implementation of the rule: ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpp"``.
        skip_path: ``"found_inf"`` (the decision reaches a fused optimizer on the device) or ``"host"``.
    """

    device: torch.device
    backend: str
    energy_backend: str | None
    energy_dtypes: tuple[torch.dtype, ...]
    partials: bool
    global_energy: bool
    gate_impl: str
    skip_path: str


def make_plan(
    optimizer: torch.optim.Optimizer,
    config: GateConfig,
    lm_head: Sequence[torch.Tensor],
    *,
    backend: str = "auto",
    skip_mode: str = "auto",
    energy_group: Any = None,
    device: torch.device | None = None,
) -> Plan:
    """Resolve the :class:`Plan` (``device``: the lm_head's, by default).

    Raises:
        ValueError: ``skip_mode`` or ``backend`` is unknown; ``skip_mode="found_inf"`` with an optimizer that does
            not honour ``found_inf``.
        RuntimeError: ``backend`` is unavailable on the device.
    """
    if skip_mode not in SKIP_MODES:
        raise ValueError(f"skip_mode must be one of {SKIP_MODES}, got {skip_mode!r}")
    supported = supports_found_inf(optimizer)
    if skip_mode == "found_inf" and not supported:
        raise ValueError(
            f"skip_mode='found_inf' needs an optimizer that honours found_inf (torch Adam/AdamW/SGD/Adagrad "
            f"with fused=True); {type(optimizer).__name__} does not"
        )
    if device is None:
        device = lm_head[0].device if lm_head else _first_device(optimizer)
    resolve_backend(backend, device)  # a bad or unavailable name raises here, whatever else the plan says
    dtypes = tuple(p.dtype for p in lm_head)
    energy_backend = resolve_backend(backend, device, dtypes) if lm_head else None
    global_energy = energy_group is not None or any(is_dtensor(p) for p in lm_head)
    return Plan(
        device=torch.device(device),
        backend=backend,
        energy_backend=energy_backend,
        energy_dtypes=dtypes,
        partials=energy_backend == "triton" and not global_energy,
        global_energy=global_energy,
        gate_impl=impl_for("auto" if config.reference_only else backend, config, device),
        skip_path="found_inf" if skip_mode != "host" and supported else "host",
    )


def check_clip_backend(backend: str, optimizer: torch.optim.Optimizer) -> None:
    """Resolve ``backend`` for every device (and its dtypes) of ``optimizer``'s parameters, as the clip of
    ``max_grad_norm`` will: a name unavailable there raises now (``RuntimeError`` / ``TypeError``), not at a step."""
    by_device: dict[torch.device, set[torch.dtype]] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            by_device.setdefault(p.device, set()).add(p.dtype)
    for dev, dtypes in by_device.items():
        resolve_backend(backend, dev, tuple(dtypes))


def _first_device(optimizer: torch.optim.Optimizer) -> torch.device:
    for g in optimizer.param_groups:
        for p in g["params"]:
            return p.device
    return torch.device("cpu")
