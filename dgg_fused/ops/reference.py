"""Pure-torch reference for the lm_head gradient energy: the oracle every other backend is tested against."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["grad_sumsq_reference"]


def grad_sumsq_reference(
    tensors: Sequence[torch.Tensor],
    *,
    acc_dtype: torch.dtype = torch.float64,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sum of squares of every element of ``tensors``, accumulated in ``acc_dtype`` (float64 by default).

    Returns a 0-d ``out_dtype`` tensor (float32 by default: the "torch" backend; tests take the float64 value with
    ``out_dtype=torch.float64``) on the tensors' device (no host sync). Empty tensors contribute 0; an empty list is
    an error because the result's device would be unknown.
    """
    if len(tensors) == 0:
        raise ValueError("grad_sumsq: need at least one tensor")
    device = tensors[0].device
    total = torch.zeros((), dtype=acc_dtype, device=device)
    for t in tensors:
        if t.device != device:
            raise ValueError(f"grad_sumsq: all tensors must be on one device, got {device} and {t.device}")
        if t.numel():
            total = total + t.detach().to(acc_dtype).square().sum()
    return total.to(out_dtype)
