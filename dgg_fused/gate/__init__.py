"""The DGG gate: the rule and nothing else.

* :mod:`.state` — :class:`GateState`, the device-resident state (and its validated checkpoint form).
* :mod:`.reference` — the rule as pure tensor functions (the definition every twin is tested against).
* :mod:`.fused` — the fused twins as ``torch.library`` ops: C++ (CPU) / CUDA from the compiled extension, Triton.
* This module — :func:`gate_step_`, the one gate step (the optimizer's and the tests'), and :func:`impl_for`.

The gate does not know how the energy was measured (``dgg_fused.energy``) nor what an optimizer is; the kernels do
not know what a gate is (they receive tensors and numbers). The rule is written down in ``docs/rule.md``.
"""

from __future__ import annotations

import torch

from ..config import GateConfig
from ..ops import resolve_backend
from .fused import update_fused_
from .reference import energy_from, update_reference_, zscore
from .state import CNT_GATED_STEPS, CNT_STEPS, CNT_STOPPED_BATCHES, GateState

__all__ = ["GateState", "gate_step_", "impl_for", "zscore", "energy_from", "IMPLS", "CNT_STEPS", "CNT_GATED_STEPS",
           "CNT_STOPPED_BATCHES"]  # fmt: skip

#: Implementations of the rule: the torch reference and the fused twins.
IMPLS = ("reference", "triton", "cuda", "cpp")
#: The gate implementation that goes with each energy backend (``"torch"``: the reference rule).
_IMPL_OF_BACKEND = {"triton": "triton", "cuda": "cuda", "cpp": "cpp", "torch": "reference"}


def impl_for(impl: str, config: GateConfig, device: torch.device | str) -> str:
    """The gate implementation ``impl`` names for ``config`` on ``device``.

    ``impl`` is ``"auto"``, ``"reference"``, or a backend name of :data:`dgg_fused.ops.BACKENDS` (the twin of that
    backend; ``"torch"`` is the reference): resolved by :func:`dgg_fused.ops.resolve_backend`, the one resolver
    (``"auto"``: Triton, else CUDA on a GPU; C++ on CPU; else the reference; an explicit unavailable name raises
    ``RuntimeError``). A rule only the reference implements (:attr:`GateConfig.reference_only`: a drift statistic,
    ``action="watch"``) runs the reference; with an explicit fused ``impl`` that raises ``ValueError``.
    """
    if impl == "reference":
        return impl
    if config.reference_only:  # (a fused twin's name is the name of the backend it goes with)
        if impl not in ("auto", "torch"):
            raise ValueError(f"gate impl={impl!r} implements the energy rule with action='skip'; this gate "
                             "(a drift statistic or action='watch') runs 'reference'")
        return "reference"
    return _IMPL_OF_BACKEND[resolve_backend(impl, device)]


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
    * ``config.action="watch"``: the same rule, recorded (``gated`` = it fired) but never acted on: the skip flag
      stays 0, no batch stops, and every observed step counts as applied.

    ``impl``: see :func:`impl_for` (the optimizer passes the name its plan resolved at construction). Every
    implementation computes the same rule (to rounding of the window sums). Under ``torch.compile`` the reference
    runs (Inductor fuses its ops; no graph break, no opaque op).
    """
    if config.uses_drift and drift is None:
        raise ValueError(f"gate_step_: GateConfig.drift={config.drift!r} needs this step's drift value (drift=...)")
    if config.energy and energy is None:
        raise ValueError("gate_step_: the energy rule needs this step's lm_head energy")
    if impl != "reference" and not torch.compiler.is_compiling():
        impl = impl_for(impl, config, state.device)
    if impl == "reference" or torch.compiler.is_compiling():
        update_reference_(state, energy, config, grad_scale=grad_scale, external_skip=external_skip, drift=drift)
    else:
        update_fused_(impl, state, energy, config, grad_scale=grad_scale, external_skip=external_skip)
    return state.skip
