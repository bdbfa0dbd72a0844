"""The lm_head (output projection) of a model: finding it, telling whether it is tied to the input embedding, and
the one normaliser of an ``lm_head=`` argument (:func:`params_of`)."""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

__all__ = ["find_lm_head", "is_tied", "params_of", "TiedLmHeadWarning"]

_FALLBACK_NAMES = ("lm_head", "embed_out", "output", "output_layer", "head")


class TiedLmHeadWarning(UserWarning):
    """The lm_head weight is the input embedding matrix: its gradient carries both roles."""


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return None


def is_tied(model: nn.Module, lm_head: nn.Module | torch.Tensor) -> bool:
    """True when the lm_head weight (``lm_head.weight``, or ``lm_head`` itself when it is a tensor) is the same
    tensor as the model's input embedding weight."""
    emb = _input_embedding(model)
    w_out = lm_head if isinstance(lm_head, torch.Tensor) else getattr(lm_head, "weight", None)
    w_in = getattr(emb, "weight", None) if emb is not None else None
    return w_out is not None and w_in is not None and w_out is w_in


def find_lm_head(model: nn.Module, *, warn_tied: bool = True) -> nn.Module:
    """Return the output projection of ``model``.

    Uses Hugging Face's ``get_output_embeddings()`` when the model has it, else the first of the attributes
    ``lm_head``, ``embed_out``, ``output``, ``output_layer``, ``head`` that looks like an output projection: a
    module with a 2-D ``weight`` whose rows match the input embedding's vocabulary when the model has one.

    When the output embedding is tied to the input embedding (``tie_word_embeddings=True``, e.g. Qwen2.5-0.5B,
    Gemma), a :class:`TiedLmHeadWarning` says so: the gate then sees the energy of the *shared* matrix's gradient,
    i.e. the output-projection gradient plus the input-embedding gradient (non-zero only on rows of tokens present
    in the batch). Both grow when the policy shifts, but the statistic is no longer the pure lm_head energy the
    paper analyses; pass ``warn_tied=False`` once you have accepted that.

    Raises:
        ValueError: no output projection could be found (pass ``lm_head=`` explicitly then).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_lm_head expects an nn.Module, got {type(model).__name__}")
    head = None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
    rejected: list[str] = []
    if head is None:
        emb = _input_embedding(model)
        w_in = getattr(emb, "weight", None) if emb is not None else None
        vocab = w_in.shape[0] if w_in is not None and w_in.dim() == 2 else None
        for name in _FALLBACK_NAMES:
            cand = getattr(model, name, None)
            if not isinstance(cand, nn.Module):
                continue
            w = getattr(cand, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2 and (vocab is None or w.shape[0] == vocab):
                head = cand
                break
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else None
            why = (f"its weight {shape} does not have the input embedding's {vocab} rows" if shape and len(shape) == 2
                   else f"it has no 2-D weight (weight: {shape})")
            rejected.append(f"{name!r} ({type(cand).__name__}: {why})")
    if head is None:
        found = f"; it has {', '.join(rejected)}, not an output projection" if rejected else (
            f" and none of the attributes {_FALLBACK_NAMES}")
        raise ValueError(
            f"could not find the output projection of {type(model).__name__}: it has no get_output_embeddings() "
            f"result{found}; pass lm_head= explicitly"
        )
    if warn_tied and is_tied(model, head):
        warnings.warn(
            f"{type(model).__name__}'s lm_head weight is tied to its input embedding: the gate will see the energy "
            "of the shared matrix's gradient (output projection + input embedding rows of the batch's tokens). "
            "See dgg_fused.find_lm_head's docstring.",
            TiedLmHeadWarning,
            stacklevel=2,
        )
    return head


def params_of(lm_head: nn.Module | torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters an ``lm_head=`` argument names, in order and each once: all parameters of a module, one
    tensor, or the tensors of an iterable. (May be empty; callers say what that means for them.)

    Raises:
        TypeError: anything else (a string, a dict, a non-tensor in the iterable).
        ValueError: a whole model instead of its output projection: a module that holds an embedding, exposes
            ``get_output_embeddings()`` / ``get_input_embeddings()``, has an ``lm_head``-like child and parameters
            besides it, or holds parameters in more than 3 modules (an output projection has a weight, maybe a bias
            or a norm).
    """
    if isinstance(lm_head, nn.Module):
        _reject_whole_model(lm_head)
        params = list(lm_head.parameters())
    elif isinstance(lm_head, torch.Tensor):
        params = [lm_head]
    elif isinstance(lm_head, (str, bytes, dict)) or not isinstance(lm_head, Iterable):
        raise TypeError(
            "lm_head= must be an nn.Module, a Parameter or an iterable of Parameters, "
            f"got {type(lm_head).__name__}"
        )
    else:
        params = list(lm_head)
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"lm_head= iterable must hold Parameters, found {type(p).__name__}")
    return list({id(p): p for p in params}.values())


def _reject_whole_model(module: nn.Module) -> None:
    name = type(module).__name__
    why = None
    if any(isinstance(m, nn.Embedding) for m in module.modules()):
        why = "holds an nn.Embedding"
    elif callable(getattr(module, "get_output_embeddings", None)) or callable(
        getattr(module, "get_input_embeddings", None)
    ):
        why = "is a model (it has get_output_embeddings/get_input_embeddings)"
    elif any(_params_outside(module, n) for n in _FALLBACK_NAMES):
        child = next(n for n in _FALLBACK_NAMES if _params_outside(module, n))
        why = f"has an output-projection child {child!r} and parameters besides it"
    else:
        n_mod = sum(1 for m in module.modules() if any(True for _ in m.parameters(recurse=False)))
        if n_mod > 3:
            why = f"has parameters in {n_mod} modules"
    if why is not None:
        raise ValueError(
            f"lm_head= is a {name} that {why}: pass the output projection (e.g. model.lm_head, or "
            "dgg_fused.find_lm_head(model)), not the whole model"
        )


def _params_outside(module: nn.Module, name: str) -> bool:
    """``module.<name>`` is a module, and ``module`` has parameters that are not ``module.<name>``'s."""
    child = getattr(module, name, None)
    if not isinstance(child, nn.Module):
        return False
    inside = {id(p) for p in child.parameters()}
    return any(id(p) not in inside for p in module.parameters())
