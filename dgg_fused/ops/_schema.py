"""The schemas of the sum-of-squares ops that are defined in Python, and their kernels per device key.

``dgg_fused::_C_sumsq`` is defined (with its CPU and CUDA kernels) by the compiled extension (csrc/); its fake is
registered here when the extension loads. The Triton ops are defined here; their kernels (``triton_sumsq.py``) are
imported on first use, so ``import dgg_fused`` never imports triton. Which op runs is decided by
:func:`dgg_fused.ops.resolve_backend`, never inside an op.
"""

from __future__ import annotations

import importlib

import torch

from . import extension

__all__ = ["compiled_sumsq"]


def _triton():
    return importlib.import_module(f"{__package__}.triton_sumsq")


def _fake_sumsq(tensors):
    return tensors[0].new_empty((), dtype=torch.float32)


def _fake_partials(tensors):
    n = torch.library.get_ctx().new_dynamic_size()
    return tensors[0].new_empty((n,), dtype=torch.float32)


torch.library.define("dgg_fused::sumsq_triton", "(Tensor[] tensors) -> Tensor")
torch.library.define("dgg_fused::sumsq_partials_triton", "(Tensor[] tensors) -> Tensor")
# CUDA, and CPU tensors under the Triton interpreter (available_backends reports when that works).
torch.library.register_kernel("dgg_fused::sumsq_triton", ("cuda", "cpu"), lambda tensors: _triton().sumsq(tensors))
torch.library.register_kernel(
    "dgg_fused::sumsq_partials_triton", ("cuda", "cpu"), lambda tensors: _triton().sumsq_partials(tensors)
)
torch.library.register_fake("dgg_fused::sumsq_triton", _fake_sumsq)
torch.library.register_fake("dgg_fused::sumsq_partials_triton", _fake_partials)

_COMPILED: list = []


def compiled_sumsq():
    """``torch.ops.dgg_fused._C_sumsq`` with its fake registered (the extension must have loaded)."""
    if not _COMPILED:
        if not extension.load():
            raise RuntimeError(f"dgg_fused._C is unavailable: {extension.load_error()}")
        torch.library.register_fake("dgg_fused::_C_sumsq", _fake_sumsq)
        _COMPILED.append(torch.ops.dgg_fused._C_sumsq)
    return _COMPILED[0]
