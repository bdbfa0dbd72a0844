"""The sum-of-squares op (the lm_head gradient energy): its kernels, the backend choice, a float64 reference.

:func:`grad_sumsq` — sum of squares over a list of tensors, float32 accumulation, a 0-d float32 tensor on their
device, no host sync. Its kernels are ``torch.library`` ops, each schema defined once with kernels registered per
device key (and a fake implementation for ``torch.compile`` / ``opcheck``):

============================== ============================================== ===================================
op                             kernels                                        schema defined in
============================== ============================================== ===================================
``dgg_fused::_C_sumsq``        CPU (AVX2/AVX-512, 2-level), CUDA (two-stage)  csrc/dgg_fused.cpp
``dgg_fused::sumsq_triton``    CUDA (CPU only under TRITON_INTERPRET=1)       :mod:`dgg_fused.ops._schema`
``dgg_fused::sumsq_partials_`` the Triton stage 1 only (partial sums)          :mod:`dgg_fused.ops._schema`
``triton``
============================== ============================================== ===================================

Backends (:func:`available_backends`), each one of those kernels or the reference:

======== ============================================= ===========================================
name     what                                          where
======== ============================================= ===========================================
triton   persistent multi-tensor Triton reduction      CUDA tensors (CPU only under TRITON_INTERPRET=1)
cuda     dgg_fused._C CUDA kernels (two-stage)         CUDA tensors, extension built with CUDA
cpp      dgg_fused._C CPU kernel (AVX2/AVX-512)        CPU tensors, extension built
torch    pure-torch float64 reference                  anywhere
======== ============================================= ===========================================

``backend="auto"`` (:func:`resolve_backend`, the one resolver of the library, over the one preference table
:data:`AUTO_ORDER`): CUDA -> triton, else cuda, else torch; CPU -> cpp, else torch; any dtype other than
float32/bfloat16/float16 -> torch. An explicitly requested backend that is unavailable raises. This package knows
nothing of gates (the gate's implementation is named after the backend it goes with: dgg_fused.plan).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Sequence

import torch

from . import extension
from ._schema import compiled_sumsq
from .reference import grad_sumsq_reference

__all__ = [
    "grad_sumsq",
    "available_backends",
    "resolve_backend",
    "kernel",
    "validate",
    "grad_sumsq_reference",
    "BACKENDS",
    "AUTO_ORDER",
]

#: Every backend name, in the order ``backend="auto"`` prefers them on CUDA.
BACKENDS = ("triton", "cuda", "cpp", "torch")
#: ``backend="auto"``: the preference per device type (the first available one wins; ``"torch"`` runs anywhere).
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------- triton
def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


_HAS_TRITON: list[bool] = []


def _has_triton() -> bool:
    if not _HAS_TRITON:  # a package look-up per process, not per step
        _HAS_TRITON.append(importlib.util.find_spec("triton") is not None)
    return _HAS_TRITON[0]


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


def resolve_backend(backend: str, device: torch.device | str, dtypes: Sequence[torch.dtype] = ()) -> str:
    """The one resolver of a backend name for tensors of ``dtypes`` on ``device``: ``"auto"`` takes the first
    available name of :data:`AUTO_ORDER` (``"torch"`` for other devices and for dtypes the kernels do not take); an
    explicit name raises ``ValueError`` if unknown, ``RuntimeError`` if unavailable on ``device``, ``TypeError``
    for dtypes it does not take."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"unknown backend {backend!r}: choose 'auto' or one of {BACKENDS}")
    device = torch.device(device)
    avail = available_backends(device)
    fast = all(dt in _FAST_DTYPES for dt in dtypes)
    if backend == "auto":
        if not fast:
            return "torch"
        return next(name for name in AUTO_ORDER.get(device.type, ("torch",)) if name in avail)
    if backend not in avail:
        why = f" ({extension.load_error()})" if backend in ("cpp", "cuda") and extension.load_error() else ""
        raise RuntimeError(
            f"grad_sumsq: backend {backend!r} is not available for {device.type} tensors{why}; "
            f"available: {avail}"
        )
    if not fast and backend != "torch":
        raise TypeError(f"grad_sumsq: backend {backend!r} takes float32/bfloat16/float16, got {sorted(map(str, set(dtypes)))}")
    return backend


# ---------------------------------------------------------------------------------------------------- the op
def _triton_sumsq(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.ops.dgg_fused.sumsq_triton(tensors)


def kernel(name: str, *, partials: bool = False) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The callable behind a *resolved* backend name (:func:`resolve_backend`): the compiled op for ``"cpp"`` and
    ``"cuda"`` (one op, kernels per device key), the Triton op, or the float64 reference for ``"torch"``. It takes
    a list of validated (detached, strided, one-device, plain) tensors.

    ``partials=True`` (``"triton"`` only): stage 1 of the Triton reduction alone, a 1-D float32 tensor of partial
    sums whose float64 sum, rounded once, is the energy (the finalize kernel does exactly that; the fused gate
    epilogue adds them itself, so a gated step costs two launches)."""
    if partials:
        if name != "triton":
            raise ValueError(f"partial sums come from the Triton stage 1 only, not from backend {name!r}")
        return torch.ops.dgg_fused.sumsq_partials_triton
    if name in ("cpp", "cuda"):
        return compiled_sumsq()
    if name == "triton":
        return _triton_sumsq
    if name == "torch":
        return grad_sumsq_reference
    raise ValueError(f"not a resolved backend name: {name!r}")


def validate(tensors: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """The checks :func:`grad_sumsq` makes (non-empty, floating point, strided, one device); detached tensors."""
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
    ts = validate(tensors)
    name = resolve_backend(backend, ts[0].device, [t.dtype for t in ts])
    return kernel(name)(ts)
