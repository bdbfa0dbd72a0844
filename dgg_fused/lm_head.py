"""Finding the lm_head (output projection) of a model, and telling whether it is tied to the input embedding."""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["find_lm_head", "is_tied", "TiedLmHeadWarning"]

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
    if head is None:
        emb = _input_embedding(model)
        w_in = getattr(emb, "weight", None) if emb is not None else None
        vocab = w_in.shape[0] if w_in is not None and w_in.dim() == 2 else None
        for name in _FALLBACK_NAMES:
            cand = getattr(model, name, None)
            w = getattr(cand, "weight", None) if isinstance(cand, nn.Module) else None
            if w is not None and w.dim() == 2 and (vocab is None or w.shape[0] == vocab):
                head = cand
                break
    if head is None:
        raise ValueError(
            f"could not find the output projection of {type(model).__name__}: it has no get_output_embeddings() "
            f"result and none of the attributes {_FALLBACK_NAMES}; pass lm_head= explicitly"
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
