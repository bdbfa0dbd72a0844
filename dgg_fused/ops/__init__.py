"""The lm_head gradient energy op and the fused gate epilogue: public entries and the backend choice, in one place.

* :func:`grad_sumsq` — sum of squares over a list of tensors, float32 accumulation, a 0-d float32 tensor on their
  device, no host sync. It is one ``torch.library`` op, ``torch.ops.dgg_fused.grad_sumsq(tensors, backend)``, with
  a fake implementation (``torch.compile``, ``opcheck``); the backend is resolved before the op is called.
* :func:`gate_epilogue_` — the DGG gate update on the device-resident state in one launch (Triton or CUDA) or one
  C++ call; ``dgg_fused.gate`` decides when to use it (:func:`resolve_epilogue`).

Backends (:func:`available_backends`):

======== ============================================= ===========================================
name     what                                          where
======== ============================================= ===========================================
triton   persistent multi-tensor Triton reduction      CUDA tensors (CPU only under TRITON_INTERPRET=1)
cuda     dgg_fused._C CUDA kernels (two-stage)         CUDA tensors, extension built with CUDA
cpp      dgg_fused._C CPU kernel (AVX2, 2-level)       CPU tensors, extension built
torch    pure-torch float64 reference                  anywhere
======== ============================================= ===========================================

``backend="auto"`` (:func:`resolve_backend`): CUDA -> triton, else cuda, else torch; CPU -> cpp, else torch; any
dtype other than float32/bfloat16/float16 -> torch. An explicitly requested backend that is unavailable raises.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Sequence

import torch

from . import extension
from .reference import grad_sumsq_reference

__all__ = [
    "grad_sumsq",
    "grad_sumsq_partials",
    "available_backends",
    "resolve_backend",
    "resolve_epilogue",
    "gate_epilogue_",
    "grad_sumsq_reference",
    "BACKENDS",
]

#: Every backend name, in the order ``backend="auto"`` prefers them on CUDA.
BACKENDS = ("triton", "cuda", "cpp", "torch")
_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------- triton
def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_module(name: str) -> ModuleType:
    """``dgg_fused.ops.<name>``, imported on first use (so ``import dgg_fused`` never imports triton).

    On CPU the kernels run only under the Triton interpreter, which must be switched on (TRITON_INTERPRET=1)
    before triton itself is first imported: ``triton.jit`` and triton's own library functions read it then.
    """
    return importlib.import_module(f"{__name__}.{name}")


# ---------------------------------------------------------------------------------------------------- choice
def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable in this process (for ``device``, if given), in ``backend="auto"`` preference order.

    ``"triton"`` needs the triton package and a CUDA device (or TRITON_INTERPRET=1 for CPU tensors); ``"cuda"``
    the extension built with CUDA and a CUDA device; ``"cpp"`` the extension; ``"torch"`` is always there.
    """
    dev = None if device is None else torch.device(device)
    cuda_ok = torch.cuda.is_available() and (dev is None or dev.type == "cuda")
    cpu_ok = dev is None or dev.type == "cpu"
    out = []
    if _has_triton() and (cuda_ok or (cpu_ok and _triton_interpret())):
        out.append("triton")
    if cuda_ok and extension.has_cuda():
        out.append("cuda")
    if cpu_ok and extension.has_cpp():
        out.append("cpp")
    out.append("torch")
    return out


# The choice depends only on the process (what loaded, which device), so torch.compile takes it as a constant
# instead of tracing importlib and environment look-ups.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device, dtypes: Sequence[torch.dtype] = ()) -> str:
    """The one place a backend name is resolved. ``"auto"`` picks; an explicit unavailable name raises."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"grad_sumsq: unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    avail = available_backends(device)
    fast = all(dt in _FAST_DTYPES for dt in dtypes)
    if backend == "auto":
        if not fast:
            return "torch"
        if device.type == "cuda":
            for name in ("triton", "cuda"):
                if name in avail:
                    return name
        elif device.type == "cpu" and "cpp" in avail:
            return "cpp"
        return "torch"
    if backend not in avail:
        why = f" ({extension.load_error()})" if backend in ("cpp", "cuda") and extension.load_error() else ""
        raise RuntimeError(
            f"grad_sumsq: backend {backend!r} is not available for {device.type} tensors{why}; "
            f"available: {avail}"
        )
    if not fast and backend != "torch":
        raise TypeError(f"grad_sumsq: backend {backend!r} takes float32/bfloat16/float16, got {sorted(map(str, set(dtypes)))}")
    return backend


@torch.compiler.assume_constant_result
def resolve_epilogue(impl: str, device: torch.device) -> str:
    """Which implementation of the gate update runs: ``"reference"`` (dgg_fused.gate, torch ops), ``"triton"``,
    ``"cuda"`` or ``"cpp"`` (the fused ones). ``"auto"``: on CUDA triton, else cuda, else reference; elsewhere the
    reference: it is the rule's definition, and the recorded testbed runs reproduce bit-for-bit with it. On CPU it
    costs ~0.45 ms per step vs ~23 us for ``"cpp"`` (docs/benchmarks.md); pass ``impl="cpp"`` to gate_step_ for
    that."""
    if impl == "reference" or (impl == "auto" and device.type != "cuda"):
        return "reference"
    if impl != "auto" and impl not in ("triton", "cuda", "cpp"):
        raise ValueError(f"gate impl must be 'auto', 'reference', 'triton', 'cuda' or 'cpp', got {impl!r}")
    avail = available_backends(device)
    if impl == "auto":
        if device.type == "cuda":
            for name in ("triton", "cuda"):
                if name in avail:
                    return name
        return "reference"
    if impl not in avail:
        raise RuntimeError(f"gate impl {impl!r} is not available for {device.type} tensors; available: {avail}")
    return impl


# ---------------------------------------------------------------------------------------------------- the op
def _dispatch(tensors: list[torch.Tensor], backend: str) -> torch.Tensor:
    if backend in ("cpp", "cuda"):
        return torch.ops.dgg_fused._C_sumsq(tensors)
    if backend == "triton":
        return _triton_module("triton_sumsq").sumsq(tensors)
    return grad_sumsq_reference(tensors)


@torch.library.custom_op("dgg_fused::grad_sumsq", mutates_args=())
def _grad_sumsq_op(tensors: list[torch.Tensor], backend: str) -> torch.Tensor:
    return _dispatch(list(tensors), backend)


@_grad_sumsq_op.register_fake
def _grad_sumsq_fake(tensors: list[torch.Tensor], backend: str) -> torch.Tensor:
    return tensors[0].new_empty((), dtype=torch.float32)


def _validate(tensors: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    out = list(tensors)
    if not out:
        raise ValueError("grad_sumsq: need at least one tensor")
    device = None
    for t in out:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"grad_sumsq: expected tensors, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"grad_sumsq: only strided (dense) tensors are supported, got {t.layout}")
        if not t.is_floating_point():
            raise TypeError(f"grad_sumsq: expected floating-point tensors, got {t.dtype}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"grad_sumsq: all tensors must be on one device, got {device} and {t.device}")
    return [t.detach() for t in out]


def grad_sumsq(tensors: Sequence[torch.Tensor] | torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Sum of squares over all elements of ``tensors`` as a 0-d float32 tensor on their device; no host sync.

    Args:
        tensors: one tensor or a sequence of tensors (fp32, bf16, fp16; other float dtypes take the "torch"
            backend) on one device. Any shape, empty tensors, more than 2**31 elements; non-contiguous tensors
            are read in place when dense up to a permutation, otherwise copied once.
        backend: ``"auto"`` or one of :data:`BACKENDS` (see :func:`available_backends`); an explicitly requested
            backend that is not available raises ``RuntimeError``.

    Returns:
        0-d float32 tensor. Every backend is deterministic (fixed two-stage reduction order): the same input
        gives the same bits run to run.
    """
    ts = _validate(tensors)
    name = resolve_backend(backend, ts[0].device, [t.dtype for t in ts])
    return torch.ops.dgg_fused.grad_sumsq(ts, name)


def grad_sumsq_partials(tensors: Sequence[torch.Tensor], *, backend: str = "auto") -> torch.Tensor | None:
    """Stage 1 of the Triton reduction only: a 1-D float32 tensor of partial sums; their float64 sum, rounded once,
    is ``grad_sumsq(tensors)`` (the finalize kernel does exactly that). One launch; the fused gate epilogue adds the partials itself, so a gated
    step costs two launches. Returns None where that path does not apply (the resolved backend is not
    ``"triton"``, or a tensor is a subclass such as a DTensor): call :func:`grad_sumsq` then."""
    ts = _validate(tensors)
    if any(type(t) is not torch.Tensor for t in ts):
        return None
    if resolve_backend(backend, ts[0].device, [t.dtype for t in ts]) != "triton":
        return None
    return _triton_module("triton_sumsq").sumsq_partials(ts)


# ---------------------------------------------------------------------------------------------------- epilogue
def gate_epilogue_(
    impl: str,
    partials: torch.Tensor,
    state: dict[str, torch.Tensor],
    *,
    tau: float,
    std_floor: float,
    statistic: int,
    reference: int,
    grad_scale: torch.Tensor | None = None,
    external_skip: torch.Tensor | None = None,
) -> None:
    """The fused gate update (one launch on CUDA): energy = sum(partials) [/ grad_scale**2], then the rule of
    ``dgg_fused.gate.gate_step_`` on the state tensors ``window, filled, prev_energy, reuse_index, stopped,
    counters, last, skip`` (updated in place). ``impl`` is a resolved name (:func:`resolve_epilogue`)."""
    dev = state["window"].device
    partials = partials.detach().reshape(-1).to(device=dev, dtype=torch.float32)
    if grad_scale is not None:
        grad_scale = grad_scale.detach().reshape(1).to(device=dev, dtype=torch.float32)
    if external_skip is not None:
        external_skip = external_skip.detach().reshape(1).to(device=dev, dtype=torch.float32)
    args = (
        partials, grad_scale, external_skip, state["window"], state["filled"], state["prev_energy"],
        state["reuse_index"], state["stopped"], state["counters"], state["last"], state["skip"],
    )  # fmt: skip
    if impl == "triton":
        _triton_module("triton_epilogue").gate_epilogue_(
            *args, tau=tau, std_floor=std_floor, statistic=statistic, reference=reference
        )
    elif impl in ("cuda", "cpp"):
        torch.ops.dgg_fused._C_gate_epilogue(*args, tau, std_floor, statistic, reference)
    else:
        raise ValueError(f"gate_epilogue_: not a fused implementation: {impl!r}")
