"""The exact-skip protocol: how the gate's decision reaches the inner optimizer (docs/design.md, "Why a gated step is
exact").

* **Device path (``found_inf``).** Torch's fused Adam / AdamW / SGD / Adagrad read two attributes in ``step()``,
  ``found_inf`` (a 0-d float32 tensor) and ``grad_scale`` (the GradScaler protocol); at ``found_inf == 1.0`` their
  kernels return before touching anything and the step counters are rolled back. The gate's skip flag, combined by
  ``max`` with a GradScaler's own ``found_inf``, is handed over that way: exact, and the host never waits.
* **Host path.** Any other optimizer: on a reuse pass (k > 1) the skip flag is read on the host (one sync) and the
  inner ``step()`` is not called when it is set. On k = 1 the gate cannot trip: nothing is read.
* **Fused SGD's first step.** With momentum, torch's fused SGD allocates its momentum buffers uninitialised on its
  first step; skipped through ``found_inf`` they would stay garbage. Until every buffer exists the host path runs.

:func:`decide` turns a skip flag into a :class:`StepDecision`; :func:`apply_` runs the inner step under one (torch's
functional ``adamw()`` beside the ``AdamW`` class is the model: anyone holding a decision can apply it). This module
knows nothing of energies or windows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["StepDecision", "supports_found_inf", "fused_sgd_unprimed", "decide", "apply_", "HOST_PATH_WARNING"]

_FUSED_CLASSES = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)

HOST_PATH_WARNING = (
    "GatedOptimizer: {name} (without fused=True) cannot skip a step on the device, so the gate's decision is read on "
    "the host: one device sync per reuse-pass step. Torch's Adam/AdamW/SGD/Adagrad with fused=True take the "
    "sync-free path."
)


class StepDecision(NamedTuple):
    """How the inner step of one training step runs (:meth:`dgg_fused.GatedOptimizer.decide_` returns it,
    :meth:`~dgg_fused.GatedOptimizer.apply_` applies it, as often as an engine steps its client optimizer).

    ``run_inner``: False when the host path decided to skip it; ``found_inf``: the 0-d float32 device flag handed to
    a fused optimizer (1.0 = skip on the device; None: none is handed); ``grad_scale``: the scale handed with it (a
    GradScaler's, or the folded clip coefficient's; None for none)."""

    run_inner: bool
    found_inf: torch.Tensor | None
    grad_scale: torch.Tensor | None


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours ``found_inf`` / ``grad_scale`` attributes: torch's Adam, AdamW, SGD and
    Adagrad with every parameter group fused. Decided from the class and the groups, not from torch's
    ``_step_supports_amp_scaling`` flag, which a copy or pickle of a torch optimizer loses."""
    return isinstance(optimizer, _FUSED_CLASSES) and all(bool(g.get("fused")) for g in optimizer.param_groups)


def fused_sgd_unprimed(optimizer: torch.optim.Optimizer) -> bool:
    """Torch's SGD with momentum has a parameter with a gradient but no momentum buffer yet (its next step is a
    first step, which must not be skipped through ``found_inf``)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return False
    for g in optimizer.param_groups:
        if g.get("momentum", 0) != 0:
            for p in g["params"]:
                if p.grad is not None and optimizer.state.get(p, {}).get("momentum_buffer") is None:
                    return True
    return False


def decide(
    on_device: bool,
    skip: torch.Tensor | None,
    *,
    external: torch.Tensor | None,
    scaler_inf: torch.Tensor | None,
    reuse_index: int,
    optimizer: torch.optim.Optimizer,
    grad_scale: torch.Tensor | None,
) -> StepDecision:
    """The decision for the inner step.

    ``on_device``: this step takes the ``found_inf`` path (the plan's path, and fused SGD primed); ``skip``: the
    gate's 0-d skip flag, None when the gate never skips (``action="watch"``); ``external``: the caller's own skip
    (a GradScaler's ``found_inf``) on the gate's device as float32 in [0, 1], ``scaler_inf`` the same as handed in;
    ``grad_scale``: the scale for the inner step. The host path reads ``skip`` once, on reuse passes only."""
    if on_device:
        if skip is None:
            return StepDecision(True, external, grad_scale)
        return StepDecision(True, skip if external is None else torch.maximum(skip, external), grad_scale)
    run_inner = True
    if skip is not None and reuse_index > 1:  # on k == 1 the gate cannot trip: no sync needed
        run_inner = not bool(skip)  # the one host sync of the host path
    if scaler_inf is not None and not supports_found_inf(optimizer):
        scaler_inf = None  # this optimizer cannot take it: dropping the step is the caller's (as GradScaler does)
    if run_inner and scaler_inf is not None and fused_sgd_unprimed(optimizer):
        # torch's fused SGD would allocate its momentum uninitialised on a step the scaler drops: decide that drop
        # on the host too, once, until every buffer exists.
        run_inner = not bool(scaler_inf)
    return StepDecision(run_inner, scaler_inf, grad_scale)


def apply_(optimizer: torch.optim.Optimizer, decision: StepDecision) -> None:
    """Run ``optimizer.step()`` under ``decision`` (nothing when ``run_inner`` is False): its ``found_inf`` and
    ``grad_scale`` are set as attributes for the call (torch's fused optimizers read them) and removed after.

    A fused step handed a ``grad_scale`` writes the gradient it used back into ``.grad`` without bumping its
    version counter; the counters are bumped here, so that a measurement taken during backward (``energy_hook``, of
    this or another optimizer over the same parameters) is seen to be stale."""
    if not decision.run_inner:
        return
    saved = {k: optimizer.__dict__[k] for k in ("found_inf", "grad_scale") if k in optimizer.__dict__}
    if decision.found_inf is not None:
        optimizer.found_inf = decision.found_inf
    if decision.grad_scale is not None:
        optimizer.grad_scale = decision.grad_scale
    try:
        optimizer.step()
    finally:
        for k in ("found_inf", "grad_scale"):
            optimizer.__dict__.pop(k, None)
        optimizer.__dict__.update(saved)
    if decision.grad_scale is not None and supports_found_inf(optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            _bump_versions(grads)


def _bump_versions(tensors: list[torch.Tensor]) -> None:
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # a torch whose increment_version takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)
