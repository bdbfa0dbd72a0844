"""Loads the compiled extension ``dgg_fused._C`` (csrc/): the "cpp" and "cuda" backends.

A missing or broken build never breaks ``import dgg_fused``: the failure is remembered, reported once as a warning
when a compiled backend is first looked for, and the "torch" (and, on CUDA, "triton") backends remain.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

__all__ = ["load", "has_cpp", "has_cuda", "load_error"]

_state: dict[str, object] = {"tried": False, "ok": False, "error": None, "warned": False}

#: Set to 1 to behave as if the extension were not built (tests of the fallback path; also a kill switch).
DISABLE_ENV = "DGG_FUSED_DISABLE_EXT"


def load() -> bool:
    """Import ``dgg_fused._C`` once (registering ``torch.ops.dgg_fused._C_*``); True when it is usable."""
    if not _state["tried"]:
        _state["tried"] = True
        if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
            _state["error"] = f"disabled by {DISABLE_ENV}"
        else:
            try:
                importlib.import_module("dgg_fused._C")
                _state["ok"] = hasattr(torch.ops.dgg_fused, "_C_sumsq")
                if not _state["ok"]:
                    _state["error"] = "dgg_fused._C imported but registered no ops"
            except (ImportError, OSError) as exc:  # not built, or built against another torch
                _state["error"] = f"{type(exc).__name__}: {exc}"
        if not _state["ok"] and not _state["warned"] and not str(_state["error"]).startswith("disabled"):
            _state["warned"] = True
            warnings.warn(
                f"dgg_fused: compiled extension dgg_fused._C is unavailable ({_state['error']}); the 'cpp' and "
                "'cuda' backends are off, grad_sumsq falls back to 'torch' (CPU) or 'triton' (CUDA). Rebuild with "
                "`pip install --no-build-isolation -e .`",
                RuntimeWarning,
                stacklevel=3,
            )
    return bool(_state["ok"])


def has_cpp() -> bool:
    """The CPU implementation of the compiled ops is loaded."""
    return load()


def has_cuda() -> bool:
    """The compiled ops have CUDA kernels (built as CUDAExtension) and a CUDA device is usable."""
    if not load() or not torch.cuda.is_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("dgg_fused::_C_sumsq", "CUDA")


def load_error() -> str | None:
    """Why the extension is unavailable (None when it loaded)."""
    load()
    return None if _state["ok"] else str(_state["error"])
