"""The fused twins of the gate rule, as ``torch.library`` ops with kernels registered per device key.

* ``dgg_fused::_C_gate_epilogue`` — schema and kernels in the compiled extension (csrc/gate_epilogue.h, the rule
  in C++; CPU kernel in csrc/dgg_fused.cpp, CUDA kernel in csrc/cuda/ops_cuda.cpp). Its fake implementation is
  registered here when the extension loads.
* ``dgg_fused::gate_epilogue_triton`` — the same schema, defined here; its kernel (``_triton.py``, imported on
  first use so that ``import dgg_fused`` never imports triton) is registered for CUDA, and for CPU tensors under
  ``TRITON_INTERPRET=1``.

Both take the gate state as tensors and the rule's knobs as numbers (the shared codes of
:class:`dgg_fused.config.Statistic` / :class:`~dgg_fused.config.Reference`); which one runs is decided by
the optimizer's plan (:mod:`dgg_fused.plan`, one resolver: :func:`dgg_fused.ops.resolve_backend`), never inside
an op.
"""

from __future__ import annotations

import importlib

import torch

from ..config import GateConfig
from ..ops import extension
from .state import GateState

__all__ = ["SCHEMA", "update_fused_"]

#: The one Python spelling of the epilogue's signature (the C++ definition in csrc/dgg_fused.cpp is the other).
SCHEMA = (
    "(Tensor partials, Tensor? grad_scale, Tensor? external_skip, Tensor(a!) window, Tensor(b!) filled, "
    "Tensor(c!) prev_energy, Tensor reuse_index, Tensor(d!) stopped, Tensor(e!) counters, Tensor(f!) last, "
    "Tensor(g!) skip, float tau, float std_floor, int statistic, int reference) -> ()"
)

torch.library.define("dgg_fused::gate_epilogue_triton", SCHEMA)


def _triton_kernel(*args) -> None:
    *tensors, tau, std_floor, statistic, reference = args
    importlib.import_module(f"{__package__}._triton").gate_epilogue_(
        *tensors, tau=tau, std_floor=std_floor, statistic=statistic, reference=reference
    )


# Both device keys run the same Triton code: on CPU tensors it works only under the interpreter, which
# dgg_fused.ops.available_backends reports (a CPU "triton" impl is refused by resolve_backend otherwise).
torch.library.register_kernel("dgg_fused::gate_epilogue_triton", ("cuda", "cpu"), _triton_kernel)


def _fake(*args) -> None:
    return None


torch.library.register_fake("dgg_fused::gate_epilogue_triton", _fake)

_COMPILED_FAKE: dict[str, bool] = {}


def _compiled_op():
    if not _COMPILED_FAKE and extension.load():
        torch.library.register_fake("dgg_fused::_C_gate_epilogue", _fake)
        _COMPILED_FAKE["done"] = True
    return torch.ops.dgg_fused._C_gate_epilogue


def update_fused_(
    impl: str,
    state: GateState,
    energy: torch.Tensor,
    config: GateConfig,
    *,
    grad_scale: torch.Tensor | None = None,
    external_skip: torch.Tensor | None = None,
) -> None:
    """Run the resolved fused ``impl`` (``"triton"``, ``"cuda"`` or ``"cpp"``) on ``state`` in place.

    ``energy`` is 0-d or a 1-D tensor of partial sums (added in float64, in order, by the kernel)."""
    dev = state.device
    partials = _on(energy.detach().reshape(-1), dev, torch.float32)
    if grad_scale is not None:
        grad_scale = _on(grad_scale.detach().reshape(1), dev, torch.float32)
    if external_skip is not None:
        external_skip = _on(external_skip.detach().reshape(1), dev, torch.float32)
    op = torch.ops.dgg_fused.gate_epilogue_triton if impl == "triton" else _compiled_op()
    op(
        partials, grad_scale, external_skip, state.window, state.filled, state.prev_energy, state.reuse_index,
        state.stopped, state.counters, state.last, state.skip,
        config.tau, config.std_floor, int(config.statistic_code), int(config.reference_code),
    )  # fmt: skip


def _on(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device`` as ``dtype``, without a ``.to(device)`` call when it is already there."""
    if t.device != device:
        t = t.to(device)
    return t if t.dtype == dtype else t.to(dtype)
