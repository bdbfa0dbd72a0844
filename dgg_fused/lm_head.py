"""The lm_head (output projection) of a model: finding it, telling whether it is tied to the input embedding, and
the one normaliser of an ``lm_head=`` argument (:func:`params_of`).

**The tied-head warning** is issued here and nowhere else (:func:`report_tied`), once per weight, whichever entry
point met the tie: :func:`find_lm_head` and the integrations see the model and check statically (:func:`is_tied`);
``GatedOptimizer(..., lm_head=model.lm_head)`` sees only the head module, so it arms :func:`watch_tied`, which tells
at the head's first forward with autograd on whether its weight also feeds the hidden states it projects.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Iterable

import torch
from torch import nn

from .callsite import user_site, user_stacklevel

__all__ = ["find_lm_head", "is_tied", "params_of", "TiedLmHeadWarning", "check_tied", "report_tied", "accept_tied",
           "watch_tied"]

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


def _input_weight(model: nn.Module) -> torch.Tensor | None:
    emb = _input_embedding(model)
    return getattr(emb, "weight", None) if emb is not None else None


def is_tied(model: nn.Module, lm_head: nn.Module | torch.Tensor) -> bool:
    """True when the lm_head weight (``lm_head.weight``, or ``lm_head`` itself when it is a tensor) is the same
    tensor as the model's input embedding weight."""
    w_out = lm_head if isinstance(lm_head, torch.Tensor) else getattr(lm_head, "weight", None)
    w_in = _input_weight(model)
    return w_out is not None and w_in is not None and w_out is w_in


# The tied weights already reported or accepted: id -> weakref (a Tensor's == is elementwise, so no WeakSet).
_SETTLED: dict[int, weakref.ref] = {}


def _settled(weight: torch.Tensor) -> bool:
    ref = _SETTLED.get(id(weight))
    return ref is not None and ref() is weight


def accept_tied(weight: torch.Tensor) -> None:
    """Mark a tied ``weight`` as accepted: no :class:`TiedLmHeadWarning` about it from any entry point."""
    key = id(weight)
    _SETTLED[key] = weakref.ref(weight, lambda _, key=key: _SETTLED.pop(key, None))


def report_tied(weight: torch.Tensor, owner: str, *, site: tuple[str, int, str] | None = None) -> None:
    """The one :class:`TiedLmHeadWarning`: ``owner``'s lm_head ``weight`` is tied to the input embedding. Issued once
    per weight (later calls about the same weight, and calls after :func:`accept_tied`, say nothing), pointing at the
    user's line (``site``: ``(filename, lineno, module)`` of a call made earlier, for a warning raised later)."""
    if _settled(weight):
        return
    accept_tied(weight)
    msg = (
        f"{owner}: the lm_head weight is tied to the input embedding, so the gate sees the energy of the shared "
        "matrix's gradient (the output projection's plus the embedding rows of the batch's tokens), not the pure "
        "lm_head energy of the paper (see dgg_fused.find_lm_head). Once you accept that: find_lm_head(..., "
        "warn_tied=False), DGGGRPOTrainer(..., warn_tied=False) (--dgg_warn_tied false), or "
        "warnings.filterwarnings('ignore', category=dgg_fused.TiedLmHeadWarning)."
    )
    if site is None:
        warnings.warn(msg, TiedLmHeadWarning, stacklevel=user_stacklevel())
    else:
        filename, lineno, module = site
        warnings.warn_explicit(msg, TiedLmHeadWarning, filename, lineno, module)


class _TiedProbe:
    """Forward pre-hook on an lm_head module (:func:`watch_tied`): at the first forward with autograd on, reports a
    head weight that also feeds the head's input, then removes itself. Pickles as an inert probe."""

    def __init__(self, params: list[torch.Tensor], owner: str, site: tuple[str, int, str]) -> None:
        self.weights = [weakref.ref(p) for p in params]
        self.owner, self.site, self.handle = owner, site, None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling() or self.handle is None or not torch.is_grad_enabled():
            return None  # (a compiled forward: nothing to trace here; the next eager forward with autograd tells)
        targets = {id(w): w for w in (r() for r in self.weights) if w is not None and not _settled(w)}
        self.handle.remove()
        self.handle = None
        tied = _feeding(args, targets) if targets else None
        if tied is not None:
            report_tied(tied, self.owner, site=self.site)
        return None

    def __getstate__(self) -> dict[str, Any]:
        return {"weights": [], "owner": self.owner, "site": self.site, "handle": None}


def _feeding(inputs: tuple, targets: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """The tensor of ``targets`` that is a leaf of the autograd graph behind ``inputs``, or None."""
    stack = [t.grad_fn for t in inputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # an AccumulateGrad node: the leaf it accumulates into
        if var is not None and targets.get(id(var)) is var:
            return var
        stack.extend(fn for fn, _ in node.next_functions)
    return None


def watch_tied(head: nn.Module, params: list[torch.Tensor], owner: str = "GatedOptimizer(lm_head=...)") -> None:
    """Report (:func:`report_tied`) at ``head``'s first forward with autograd on whether one of ``params`` (its
    weights) also feeds the hidden states it projects: tied to the input embedding, when only the head module is
    known, not the model. The warning points at the line that called this (outside this package). Costs one walk
    of that forward's autograd graph, once; nothing when every weight is already reported or accepted."""
    if all(_settled(p) for p in params):
        return
    probe = _TiedProbe(params, owner, user_site())
    probe.handle = head.register_forward_pre_hook(probe)


def find_lm_head(model: nn.Module, *, warn_tied: bool | None = True) -> nn.Module:
    """Return the output projection of ``model``.

    Uses Hugging Face's ``get_output_embeddings()`` when the model has it, else the first of the attributes
    ``lm_head``, ``embed_out``, ``output``, ``output_layer``, ``head`` that looks like an output projection: a
    module with a 2-D ``weight`` whose rows match the input embedding's vocabulary when the model has one.

    When the output embedding is tied to the input embedding (``tie_word_embeddings=True``, e.g. Qwen2.5-0.5B,
    Gemma), a :class:`TiedLmHeadWarning` says so: the gate then sees the energy of the *shared* matrix's gradient,
    i.e. the output-projection gradient plus the input-embedding gradient (non-zero only on rows of tokens present
    in the batch). Both grow when the policy shifts, but the statistic is no longer the pure lm_head energy the
    paper analyses; pass ``warn_tied=False`` once you have accepted that (no entry point warns about this weight
    then: :func:`accept_tied`). ``warn_tied=None`` leaves the tie alone (neither warns nor accepts it).

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
        w_in = _input_weight(model)
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
    if warn_tied is not None:
        check_tied(model, head, warn=warn_tied)
    return head


def check_tied(model: nn.Module, head: nn.Module | Iterable[torch.Tensor], *, warn: bool = True) -> None:
    """When ``head`` (the output projection, or the parameters the gate watches) holds ``model``'s input embedding
    weight: :func:`report_tied` (``warn``) or :func:`accept_tied`."""
    w_in = _input_weight(model)
    weights = [getattr(head, "weight", None)] if isinstance(head, nn.Module) else list(head)
    if w_in is None or not any(w is w_in for w in weights):
        return
    if warn:
        report_tied(w_in, type(model).__name__)
    else:
        accept_tied(w_in)


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
