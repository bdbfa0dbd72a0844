"""The DGG gate: the rule and nothing else.

* :mod:`.state` — :class:`GateState`, the device-resident state (and its validated checkpoint form).
* :mod:`.reference` — the rule as pure tensor functions (the definition every twin is tested against).
* :mod:`.fused` — the fused twins as ``torch.library`` ops: C++ (CPU) / CUDA from the compiled extension, Triton.
* This module — :func:`resolve_impl`, the one place that picks among them, and :func:`gate_step_`.

The gate does not know how the energy was measured (``dgg_fused.energy``) nor what an optimizer is; the kernels do
not know what a gate is (they receive tensors and numbers). The rule is written down in ``docs/rule.md``.
"""

from __future__ import annotations

import torch

from ..config import GateConfig
from ..ops import available_backends
from .fused import update_fused_
from .reference import energy_from, update_reference_, zscore
from .state import CNT_GATED_STEPS, CNT_STEPS, CNT_STOPPED_BATCHES, GateState

__all__ = ["GateState", "gate_step_", "zscore", "energy_from", "resolve_impl", "impl_for_backend", "IMPLS",
           "step_resolved_", "impl_for_config", "CNT_STEPS", "CNT_GATED_STEPS", "CNT_STOPPED_BATCHES"]  # fmt: skip

#: Implementations of the rule: the torch reference and the fused twins.
IMPLS = ("reference", "triton", "cuda", "cpp")


def impl_for_backend(backend: str) -> str:
    """The gate implementation that goes with an energy ``backend`` name: ``backend=`` of
    :class:`~dgg_fused.GatedOptimizer` governs both (``"torch"`` -> ``"reference"``, ``"auto"`` -> ``"auto"``)."""
    return "reference" if backend == "torch" else backend


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """The one place the gate implementation is chosen.

    ``"auto"``: on CUDA ``"triton"``, else ``"cuda"``; on CPU ``"cpp"`` (the C++ twin: one call instead of ~100
    small torch ops) when the extension is built; else ``"reference"``. An explicit name that is unavailable on
    ``device`` raises ``RuntimeError``; an unknown one ``ValueError``. (Under ``torch.compile``,
    :func:`gate_step_` runs the reference, whose ops Inductor fuses.)
    """
    if impl != "auto" and impl not in IMPLS:
        raise ValueError(f"gate impl must be 'auto' or one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return impl
    dev = torch.device(device)
    avail = available_backends(dev)
    if impl == "auto":
        prefs = ("triton", "cuda") if dev.type == "cuda" else ("cpp",) if dev.type == "cpu" else ()
        return next((name for name in prefs if name in avail), "reference")
    if impl not in avail:
        raise RuntimeError(f"gate impl {impl!r} is not available for {dev.type} tensors; available: {avail}")
    return impl


def gate_step_(
    state: GateState,
    energy: torch.Tensor | None,
    config: GateConfig,
    external_skip: torch.Tensor | None = None,
    *,
    drift: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """One DGG decision: update ``state`` in place and return the 0-d float32 skip flag (1.0 = drop the step).

    ``energy`` is the lm_head gradient energy of this step: 0-d (any float dtype; promoted to float32) or a 1-D
    tensor of partial sums (added in float64 and rounded once). ``grad_scale`` (a GradScaler's scale) divides it by
    ``grad_scale**2``. The rule (docs/rule.md):

    * ``x_E = E_t`` and ``x_I = E_t - E_prev``; ``z = Z(x)`` against the window row(s) chosen by
      ``config.statistic`` (``"both"``: the larger Z, ignoring an undefined one); a non-finite energy has z = +inf.
    * The gate is *active* when k > 1, the window row(s) in use are full, and the batch has not tripped yet.
    * ``trip = active and z > tau``; a trip stops the batch: this and every later step until
      ``set_reuse_index(1)`` is skipped. Steps on a stopped batch change nothing but the counters.
    * Finite observations enter the window as ``config.reference`` says.
    * ``external_skip`` (0-d, > 0 means set): a step the caller drops anyway (a GradScaler overflow). The gate
      ignores it like a step on a stopped batch: no trip, no window update, only ``steps`` is counted.
    * Drift (``config.drift`` set): ``drift`` (0-d) is the watched policy-drift statistic of this step. Its rule
      (``config.drift_rule``) is ``drift > drift_threshold`` or ``Z(drift) > tau`` against its own window (full),
      a non-finite value counting as exceeded; it combines with the energy rule by ``config.combine`` (``"any"``:
      either trips; ``"all"``: both must). Trips, stops and windows then follow the same rules as above.
      ``config.energy=False``: only the drift rule; ``energy`` may be None.

    ``impl``: ``"auto"`` or one of :data:`IMPLS`, resolved by :func:`resolve_impl` (callers that step often resolve
    once and pass the resolved name). Every implementation computes the same rule (to rounding of the window sums).
    The fused twins cover the energy-only rule: with a drift statistic configured the reference runs (still on the
    device, no sync), and an explicit fused ``impl`` raises ``ValueError``.
    """
    impl = impl_for_config(impl, config)
    if config.uses_drift and drift is None:
        raise ValueError(f"gate_step_: GateConfig.drift={config.drift!r} needs this step's drift value (drift=...)")
    if config.energy and energy is None:
        raise ValueError("gate_step_: the energy rule needs this step's lm_head energy")
    if not torch.compiler.is_compiling():
        impl = resolve_impl(impl, state.device)
    return step_resolved_(
        state, energy, config, impl, grad_scale=grad_scale, external_skip=external_skip, drift=drift
    )


def impl_for_config(impl: str, config: GateConfig) -> str:
    """``impl`` for a gate with ``config``: a drift gate runs the reference (``"auto"`` -> ``"reference"``; a fused
    name raises ``ValueError``: the twins implement the energy-only rule)."""
    if config.uses_drift:
        if impl not in ("auto", "reference"):
            raise ValueError(f"gate impl={impl!r} implements the energy-only rule; a drift gate runs 'reference'")
        return "reference"
    return impl


def step_resolved_(
    state: GateState,
    energy: torch.Tensor | None,
    config: GateConfig,
    impl: str,
    *,
    grad_scale: torch.Tensor | None = None,
    external_skip: torch.Tensor | None = None,
    drift: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`gate_step_` with ``impl`` already resolved (the optimizer resolves it once, at construction)."""
    if impl == "reference" or torch.compiler.is_compiling():
        # under torch.compile Inductor fuses the reference's ops itself (no graph break, no opaque op)
        update_reference_(
            state, energy, config, grad_scale=grad_scale, external_skip=external_skip, drift=drift
        )
    else:
        update_fused_(impl, state, energy, config, grad_scale=grad_scale, external_skip=external_skip)
    return state.skip
