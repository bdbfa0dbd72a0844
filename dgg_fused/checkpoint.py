"""Checkpoints of a :class:`~dgg_fused.GatedOptimizer`: the gate's entry of ``state_dict()`` and the DCP helpers.

The optimizer's ``state_dict()`` is the inner optimizer's plus, under the ``"dgg"`` key::

    {"format": 1, "config": GateConfig.to_dict(), "reuse_index": k, "gate": GateState.state_dict()}

Small plain tensors and Python scalars only, so ``torch.load(..., weights_only=True)`` reads it. Everything is
validated (keys, shapes, dtypes, values, and the gate's ``reuse_index`` against the saved one) before anything is
written: a bad checkpoint raises and changes nothing.

**torch.distributed.checkpoint (DCP):** use :func:`get_state_dict` / :func:`set_state_dict` here instead of
torch's ``torch.distributed.checkpoint.state_dict`` functions with the wrapper. Torch's versions would drop the
``"dgg"`` entry, and on a fresh optimizer they initialise the state by calling ``step()`` once with zero gradients
-- through the gate, which would count that step and put a zero energy in its window.

This module does not import :mod:`dgg_fused.optimizer` (which imports it): it recognises a gated optimizer by its
gate state.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .config import GateConfig, is_int
from .gate.state import GateState

__all__ = ["STATE_KEY", "FORMAT", "WindowMismatch", "gate_entry", "parse_gate_entry", "get_state_dict",
           "set_state_dict"]

STATE_KEY = "dgg"
FORMAT = 1


class WindowMismatch(ValueError):
    """The checkpoint's gate state was written with another ``GateConfig.window`` than this optimizer's (``saved``,
    ``current``): its window cannot be loaded. The message says the two ways out."""

    def __init__(self, saved: int, current: int) -> None:
        self.saved, self.current = saved, current
        super().__init__(
            f"checkpoint gate window is {saved}, this optimizer's is {current}: build the optimizer with "
            f"GateConfig(window={saved}) to resume the gate, or start the gate fresh by loading the state dict "
            f"without its '{STATE_KEY}' entry (opt.load_state_dict({{k: v for k, v in sd.items() if k != "
            f"'{STATE_KEY}'}}): the inner optimizer resumes, the gate warms up again)"
        )


def gate_entry(config: GateConfig, reuse_index: int, gate: GateState) -> dict[str, Any]:
    """The ``"dgg"`` entry of a state dict (copies: a checkpoint never aliases live state)."""
    return {"format": FORMAT, "config": config.to_dict(), "reuse_index": reuse_index, "gate": gate.state_dict()}


def parse_gate_entry(entry: Any, config: GateConfig, device: torch.device) -> tuple[int, GateState]:
    """Validate a ``"dgg"`` entry against the current ``config``; returns ``(reuse_index, gate state)`` (a scratch
    state on ``device``, to be copied into the live one). Raises ``ValueError`` without side effects."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise ValueError(f"state_dict['{STATE_KEY}'] is not a dgg_fused gate state of format {FORMAT}")
    missing = {"config", "reuse_index", "gate"} - set(entry)
    if missing:
        raise ValueError(f"state_dict['{STATE_KEY}'] lacks {sorted(missing)}")
    saved = entry["config"]
    if not isinstance(saved, dict) or not is_int(saved.get("window")):
        raise ValueError(f"state_dict['{STATE_KEY}']['config'] is not a GateConfig dict with a window")
    if saved["window"] != config.window:
        raise WindowMismatch(saved["window"], config.window)
    # the saved settings are only compared (a checkpoint written before a GateConfig check was added still loads)
    mine = config.to_dict()
    if any(saved.get(k, v) != v for k, v in mine.items()) or set(saved) - set(mine):
        warnings.warn(f"loading gate state written with GateConfig settings {saved}; keeping the current {config}")
    k = entry["reuse_index"]
    if not is_int(k) or not (1 <= k <= config.max_reuse):
        raise ValueError(f"checkpoint reuse_index {k!r} is outside [1, {config.max_reuse}]")
    scratch = GateState.create(config.window, device)
    # shapes, dtypes and values, as a state of this config's gate (its action decides the counters' invariants)
    scratch.load_state_dict(entry["gate"], max_reuse=config.max_reuse, action=config.action)
    gate_k = int(scratch.reuse_index.cpu())
    if gate_k != int(k):
        raise ValueError(
            f"checkpoint is inconsistent: reuse_index {k} but the gate state's reuse_index is {gate_k} (the host "
            "path would apply steps the gate skips)"
        )
    return int(k), scratch


def _as_gated(optimizer: Any) -> Any:
    if not isinstance(optimizer, torch.optim.Optimizer) or not isinstance(getattr(optimizer, "_gate", None), GateState):
        raise TypeError(f"expected a GatedOptimizer, got {type(optimizer).__name__}")
    return optimizer


def get_state_dict(model: torch.nn.Module, optimizer: Any, *, options: Any = None) -> tuple[dict, dict]:
    """``torch.distributed.checkpoint.state_dict.get_state_dict`` for a :class:`~dgg_fused.GatedOptimizer`.

    Returns ``(model_state_dict, optim_state_dict)``: torch's FQN-keyed (sharded) state dicts of the model and of the
    *inner* optimizer, plus the gate's state under ``optim_state_dict["dgg"]`` (small plain tensors, identical on
    every rank). Save them with ``torch.distributed.checkpoint.save``; to resume, build the same structure on the
    fresh model/optimizer with this function, ``dcp.load`` into it, then call :func:`set_state_dict`.
    """
    from torch.distributed.checkpoint import state_dict as dcp_sd

    gated = _as_gated(optimizer)
    msd, osd = dcp_sd.get_state_dict(model, gated.optimizer, options=options)
    osd = dict(osd)
    osd[STATE_KEY] = gated.state_dict()[STATE_KEY]
    return msd, osd


def set_state_dict(
    model: torch.nn.Module, optimizer: Any, *, model_state_dict: dict, optim_state_dict: dict, options: Any = None
) -> None:
    """Inverse of :func:`get_state_dict`: load the model, the inner optimizer and the gate."""
    from torch.distributed.checkpoint import state_dict as dcp_sd

    gated = _as_gated(optimizer)
    osd = dict(optim_state_dict)
    dgg = osd.pop(STATE_KEY, None)
    dcp_sd.set_state_dict(
        model, gated.optimizer, model_state_dict=model_state_dict, optim_state_dict=osd, options=options
    )
    if dgg is not None:  # validated (window, format, values) before anything of the gate is written
        gated.load_state_dict({**gated.optimizer.state_dict(), STATE_KEY: dgg})
