"""The lm_head gradient energy op: one public entry, :func:`grad_sumsq`, and the backend choice in one place.

For now the only backend is the pure-torch reference (``"torch"``); the fused Triton / C++ / CUDA backends plug in
here (see the kernels issue) without the optimizer or the gate knowing which one ran.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .reference import grad_sumsq_reference

__all__ = ["grad_sumsq", "available_backends", "grad_sumsq_reference"]

_BACKENDS = ("torch",)


def available_backends() -> list[str]:
    """Names of the energy backends usable in this process, in the order ``backend="auto"`` prefers them."""
    return list(_BACKENDS)


def _validate(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    out = list(tensors)
    if not out:
        raise ValueError("grad_sumsq: need at least one tensor")
    for t in out:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"grad_sumsq: expected tensors, got {type(t).__name__}")
        if t.is_sparse:
            raise TypeError("grad_sumsq: sparse tensors are not supported")
        if not t.is_floating_point():
            raise TypeError(f"grad_sumsq: expected floating-point tensors, got {t.dtype}")
    return out


def grad_sumsq(tensors: Sequence[torch.Tensor] | torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Sum of squares over all elements of ``tensors`` as a 0-d float32 tensor on their device; no host sync.

    Args:
        tensors: one tensor or a sequence of tensors (fp32, bf16, fp16) on one device.
        backend: ``"auto"`` or one of :func:`available_backends`; an explicitly requested backend that is not
            available raises ``RuntimeError``.
    """
    ts = _validate(tensors)
    if backend not in ("auto",) + _BACKENDS:
        raise RuntimeError(f"grad_sumsq: backend {backend!r} is not available; available: {available_backends()}")
    return grad_sumsq_reference(ts)
