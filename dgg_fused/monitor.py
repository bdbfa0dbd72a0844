"""DWD diagnostics: per-module relative weight change and lm_head gradient energy, for plots and logs.

"Disproportionate weight drift" (DWD) is the claim that, when a rollout batch is reused for several passes, the
lm_head moves far more than the rest of the network, and that its gradient energy surges on the reuse passes.
:class:`DWDMonitor` measures exactly those quantities in any training loop, so the claim can be checked instead of
assumed:

* **relative weight change** ``||W - W0|| / ||W0||`` per parameter group (lm_head, attention, MLP, norms,
  embeddings, other), with the lm_head additionally split into the rows of tokens the task *uses* and the rows it never
  samples (in an LLM-sized vocabulary almost all rows are of the second kind);
* **lm_head gradient energy** ``||g||^2`` per optimizer step, tagged with the reuse index k (1 = on-policy pass),
  split the same way into used and unused rows;
* **lm_head update norm** ``||W_after - W_before||`` per step — the step the optimizer actually applied, i.e. the
  gradient *after* Adam's preconditioning — split into used and unused rows. Adam normalises each coordinate, so
  tiny, sign-noisy gradients on rarely used rows can turn into full-size steps; the energy does not see that, the
  update norm does.

Example::

    mon = DWDMonitor(model, lm_head=model.lm_head, used_rows=task_token_ids)
    for batch in batches:
        for k in range(1, K + 1):
            loss(model, batch).backward()
            mon.record_gradients(k)      # before clipping: the energy the gate sees
            mon.begin_step()
            opt.step()
            mon.end_step(k)              # the applied update
            opt.zero_grad()
        log(mon.weight_change())         # {"lm_head": .., "lm_head/used": .., "lm_head/unused": .., "attention": ..}

:class:`HarmOracle` answers a different question: is a given reuse step *harmful*? It records, per optimizer
step, the change of an exact held-out metric (the testbed's exact expected reward) together with any candidate
gate signals (the gate's Z-score, approximate KL, clip fraction, ...), and then scores each signal directly: its
AUC for harmful steps (:func:`signal_auc`) and what removing its trips would have changed (:func:`trip_effect`).

Every method here reads values to the host (``.item()``): the monitor is a diagnostic, not part of the fast path.
Call it every step in a small experiment, or every N steps in a large one. Parameter snapshots cost one copy of
every tracked parameter (``W0``) plus one copy of the lm_head weight while a step is in flight.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .lm_head import is_tied, params_of

__all__ = ["DWDMonitor", "classify_parameters", "GROUP_ORDER", "HarmOracle", "TripEffect", "auc", "signal_auc",
           "trip_effect", "trip_steps"]

#: The default groups, in display order. ``"lm_head"`` is found by identity; the rest by parameter name.
GROUP_ORDER = ("lm_head", "attention", "mlp", "norms", "embeddings", "other")

_NAME_RULES = (  # in order: norms first, so that e.g. Llama's ``post_attention_layernorm`` is not "attention"
    ("norms", ("norm", "ln_")),
    ("embeddings", ("embed", "wte", "wpe", "word_embeddings", "position_embeddings")),
    ("attention", ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")),
    ("mlp", ("mlp", "feed_forward", "ffn", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")),
)


def classify_parameters(model: nn.Module, lm_head: Iterable[torch.Tensor] = ()) -> dict[str, list[nn.Parameter]]:
    """Split ``model``'s trainable parameters into the groups of :data:`GROUP_ORDER`.

    Args:
        model: any module.
        lm_head: the output projection's parameters (matched by identity, so an input embedding tied to it is
            counted once, as lm_head).

    Returns:
        ``{group: [parameters]}`` for the non-empty groups. A parameter goes to the first rule whose substring
        occurs in its (lower-cased) name: norms (``norm``, ``ln_``: RMSNorm / LayerNorm weights and biases, also
        Llama's ``post_attention_layernorm``), embeddings, attention, MLP; anything else (biases of unnamed
        modules) is ``"other"``.
    """
    head_ids = {id(p) for p in lm_head}
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in GROUP_ORDER}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in head_ids:
            groups["lm_head"].append(p)
            continue
        low = name.lower()
        for group, keys in _NAME_RULES:
            if any(k in low for k in keys):
                groups[group].append(p)
                break
        else:
            groups["other"].append(p)
    return {g: ps for g, ps in groups.items() if ps}


def _lm_head_weight(lm_head: nn.Module | torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the output projection's weight, all its parameters): a module with a ``weight``, or that weight."""
    if not isinstance(lm_head, (nn.Module, torch.Tensor)):
        raise TypeError(f"lm_head must be an nn.Module or a Parameter, got {type(lm_head).__name__}")
    params = params_of(lm_head)  # the one normaliser (it also refuses a whole model)
    w = getattr(lm_head, "weight", None) if isinstance(lm_head, nn.Module) else lm_head
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"lm_head module {type(lm_head).__name__} has no weight tensor")
    return w, params


class DWDMonitor:
    """Measure weight drift per module and lm_head gradient energy / update norm per step and reuse index.

    Args:
        model: the policy. Its parameters are snapshotted at construction (``W0``); :meth:`reset_reference`
            takes a new snapshot.
        lm_head: the output projection (a module with a ``weight`` of shape ``[vocab, hidden]``, or that weight).
            Defaults to ``model.get_output_embeddings()``.
        used_rows: token ids whose lm_head rows count as "used" (the task's tokens). ``None``: no split, only
            the ``"lm_head"`` totals are reported.
        groups: override the parameter groups (``{name: [parameters]}``); defaults to
            :func:`classify_parameters`. The lm_head row split is reported in addition to these groups.

    Attributes:
        tied: True when the lm_head weight is the model's input embedding weight (tied word embeddings, e.g.
            SmolLM2, Qwen2.5-0.5B): the ``"lm_head"`` group is then that one shared matrix, counted once (there is
            no separate ``"embeddings"`` entry for it), and its energy is the shared matrix's gradient.
        steps: one dict per :meth:`record_gradients` / :meth:`end_step` pair, in order. Keys: ``step``,
            ``reuse_index``, ``energy``, ``energy_used``, ``energy_unused`` (from :meth:`record_gradients`), and
            ``update``, ``update_used``, ``update_unused``, ``skipped`` (from :meth:`end_step`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lm_head: nn.Module | torch.Tensor | None = None,
        used_rows: Sequence[int] | torch.Tensor | None = None,
        groups: Mapping[str, Sequence[nn.Parameter]] | None = None,
    ) -> None:
        if lm_head is None:
            get = getattr(model, "get_output_embeddings", None)
            lm_head = get() if callable(get) else None
            if lm_head is None:
                raise ValueError("DWDMonitor: pass lm_head= (the model has no get_output_embeddings())")
        self.model = model
        self.lm_head_weight, head_params = _lm_head_weight(lm_head)
        self.tied = is_tied(model, self.lm_head_weight)
        vocab = self.lm_head_weight.shape[0]
        if groups is None:
            groups = classify_parameters(model, head_params)
        self.groups: dict[str, list[torch.Tensor]] = {g: list(ps) for g, ps in groups.items()}
        if used_rows is None:
            self._used_mask = None
        else:
            idx = torch.as_tensor(used_rows, dtype=torch.long).flatten()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab):
                raise ValueError(f"used_rows must be token ids in [0, {vocab}), got range [{int(idx.min())}, {int(idx.max())}]")
            mask = torch.zeros(vocab, dtype=torch.bool, device=self.lm_head_weight.device)
            mask[idx.to(mask.device)] = True
            self._used_mask = mask
        self.steps: list[dict[str, float]] = []
        self._pending: dict[str, float] | None = None
        self._before: torch.Tensor | None = None
        self.reset_reference()

    # ------------------------------------------------------------------ weight change
    def reset_reference(self) -> None:
        """Snapshot every tracked parameter as the new ``W0`` (and clear nothing else)."""
        self._w0 = {id(p): p.detach().clone() for ps in self.groups.values() for p in ps}

    @property
    def n_used_rows(self) -> int:
        """Number of lm_head rows counted as used (0 when no split was requested)."""
        return 0 if self._used_mask is None else int(self._used_mask.sum())

    @torch.no_grad()
    def weight_change(self) -> dict[str, float]:
        """Relative weight change ``||W - W0|| / ||W0||`` per group (Frobenius norms over the whole group).

        Returns:
            ``{group: value}`` for every group, plus ``"lm_head/used"`` and ``"lm_head/unused"`` (the lm_head
            weight's used and unused rows) when ``used_rows`` was given. A group whose ``W0`` is all zeros reports
            the absolute change ``||W - W0||`` instead of dividing by zero.
        """
        out: dict[str, float] = {}
        for g, ps in self.groups.items():
            num = den = 0.0
            for p in ps:
                w0 = self._w0[id(p)]
                num += float((p.detach().double() - w0.double()).square().sum())
                den += float(w0.double().square().sum())
            out[g] = math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)
        if self._used_mask is not None:
            w = self.lm_head_weight.detach().double()
            w0 = self._w0.get(id(self.lm_head_weight))
            if w0 is None:
                w0 = w  # lm_head not among the groups: nothing to compare against
            w0 = w0.double()
            d2 = (w - w0).square().sum(dim=tuple(range(1, w.dim())))
            n2 = w0.square().sum(dim=tuple(range(1, w.dim())))
            for key, m in (("lm_head/used", self._used_mask), ("lm_head/unused", ~self._used_mask)):
                num, den = float(d2[m].sum()), float(n2[m].sum())
                out[key] = math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)
        return out

    # ------------------------------------------------------------------ per-step energy and update
    def _split_sumsq(self, t: torch.Tensor) -> tuple[float, float, float]:
        rows = t.detach().double().square()
        if rows.dim() > 1:
            rows = rows.sum(dim=tuple(range(1, rows.dim())))
        total = float(rows.sum())
        if self._used_mask is None:
            return total, float("nan"), float("nan")
        used = float(rows[self._used_mask].sum())
        return total, used, total - used

    @torch.no_grad()
    def record_gradients(self, reuse_index: int = 1) -> dict[str, float]:
        """Record the lm_head gradient energy of the step about to be taken (call after ``backward()``).

        Call it where the gradient is the one of interest (before ``clip_grad_norm_``, like the gate).
        Returns ``{"energy", "energy_used", "energy_unused"}`` (squared L2 norms; NaN splits without
        ``used_rows``).
        """
        g = self.lm_head_weight.grad
        if g is None:
            raise RuntimeError("DWDMonitor.record_gradients: lm_head weight has no .grad; call backward() first")
        e, eu, en = self._split_sumsq(g)
        self._pending = {
            "step": len(self.steps),
            "reuse_index": int(reuse_index),
            "energy": e,
            "energy_used": eu,
            "energy_unused": en,
        }
        return {"energy": e, "energy_used": eu, "energy_unused": en}

    @torch.no_grad()
    def begin_step(self) -> None:
        """Snapshot the lm_head weight just before ``optimizer.step()`` (for :meth:`end_step`)."""
        self._before = self.lm_head_weight.detach().clone()

    @torch.no_grad()
    def end_step(self, reuse_index: int | None = None, *, skipped: bool | None = None) -> dict[str, float]:
        """Record the update the optimizer applied to the lm_head (call right after ``optimizer.step()``).

        Appends one entry to :attr:`steps` (merged with the pending :meth:`record_gradients` entry, if any) and
        returns it. ``skipped`` (1.0/0.0 in the entry) says whether the optimizer dropped the step (e.g.
        ``GatedOptimizer.metrics["skipped"]``); when not given, a step that left the weight bit-identical counts
        as skipped (which also catches a genuinely zero update).
        """
        if self._before is None:
            raise RuntimeError("DWDMonitor.end_step: call begin_step() before optimizer.step()")
        d = self.lm_head_weight.detach() - self._before
        self._before = None
        u, uu, un = self._split_sumsq(d)
        entry = self._pending or {"step": len(self.steps), "energy": float("nan"), "energy_used": float("nan"),
                                  "energy_unused": float("nan")}
        self._pending = None
        if reuse_index is not None:
            entry["reuse_index"] = int(reuse_index)
        entry.setdefault("reuse_index", 1)
        entry.update(
            update=math.sqrt(u),
            update_used=math.sqrt(uu) if uu == uu else float("nan"),
            update_unused=math.sqrt(max(un, 0.0)) if un == un else float("nan"),
            skipped=float(u == 0.0) if skipped is None else float(bool(skipped)),
        )
        self.steps.append(entry)
        return entry

    # ------------------------------------------------------------------ summaries
    def by_reuse_index(self, key: str = "energy", *, include_skipped: bool = False) -> dict[int, float]:
        """Median of ``key`` (any :attr:`steps` field) per reuse index k, over the recorded steps.

        Skipped steps (gated: the weight did not move) are left out unless ``include_skipped``.
        """
        vals: dict[int, list[float]] = {}
        for s in self.steps:
            if not include_skipped and s.get("skipped", 0.0) == 1.0:
                continue
            v = s.get(key, float("nan"))
            if v == v:
                vals.setdefault(int(s["reuse_index"]), []).append(float(v))
        return {k: statistics.median(v) for k, v in sorted(vals.items())}

    def reuse_ratio(self, key: str = "energy") -> dict[int, float]:
        """:meth:`by_reuse_index` divided by its k = 1 value: >1 means reuse passes see a larger ``key``.

        This is the "energy surge" of the DWD claim when ``key="energy"``, and the Adam-amplified drift of
        rarely used rows when ``key="update_unused"``. Empty when no k = 1 step was recorded.
        """
        med = self.by_reuse_index(key)
        base = med.get(1)
        if not base:
            return {}
        return {k: v / base for k, v in med.items()}


# ---------------------------------------------------------------------------------------------- harm oracle
def auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` class: the probability that a random positive
    scores above a random negative, ties counting one half (the Mann-Whitney statistic). NaN when a class is
    empty or a score is NaN."""
    if len(scores) != len(positive):
        raise ValueError(f"auc: {len(scores)} scores for {len(positive)} labels")
    if any(s != s for s in scores):
        return float("nan")
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return float("nan")
    # rank-sum with average ranks for ties: O(n log n)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2.0 + 1.0
        i = j + 1
    r_pos = sum(r for r, p in zip(ranks, positive) if p)
    n_p, n_n = len(pos), len(neg)
    return (r_pos - n_p * (n_p + 1) / 2.0) / (n_p * n_n)


def _reuse_steps(steps: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [s for s in steps if int(s["reuse_index"]) > 1]


def signal_auc(steps: Sequence[Mapping[str, Any]], signal: str) -> float:
    """AUC of ``signal`` for *harmful* reuse steps (reuse index k > 1 whose ``delta`` < 0), over ``steps``
    (dicts with ``reuse_index``, ``delta`` and the signal; e.g. :attr:`HarmOracle.steps`). 0.5 = blind; above
    0.5 = the signal is higher on harmful steps, as a gate that trips on high values needs."""
    rs = _reuse_steps(steps)
    return auc([float(s[signal]) for s in rs], [float(s["delta"]) < 0.0 for s in rs])


@dataclass(frozen=True)
class TripEffect:
    """What a threshold rule on one signal would have removed from a recorded (never-gated) run.

    ``trips``: batches where the signal exceeded the threshold on a reuse step; ``removed_steps``: that step and
    every later step of its batch (a trip ends reuse); ``removed_delta``: the sum of their metric changes (negative
    = the rule would have removed harm); ``random_delta``: the same number of reuse steps at the run's mean reuse
    step change (what a rule that stops at random would remove, on average). The sum of per-step changes is a
    first-order estimate: later steps would have started elsewhere had an earlier one been dropped.
    """

    trips: int
    removed_steps: int
    removed_delta: float
    random_delta: float


def _new_occurrence(steps: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Per step: does it start a new occurrence of a batch? A batch's steps are contiguous; a first-pass step after
    a reuse step starts a new occurrence even when its id repeats (epochs)."""
    out, prev = [], None
    for s in steps:
        b, k = s["batch"], int(s["reuse_index"])
        out.append(prev is None or b != prev[0] or (k == 1 and prev[1] > 1))
        prev = (b, k)
    return out


def trip_steps(steps: Sequence[Mapping[str, Any]], signal: str, threshold: float) -> list[int]:
    """Where the rule "on a reuse step, trip when ``signal > threshold``" trips in a recorded (never-gated) run:
    the indices into ``steps`` (dicts with ``batch``, ``reuse_index`` and the signal, in step order) of each
    batch occurrence's first reuse step whose signal exceeds ``threshold`` (a trip ends reuse of the batch)."""
    out, stopped = [], False
    for i, (s, new) in enumerate(zip(steps, _new_occurrence(steps))):
        stopped = stopped and not new
        if not stopped and int(s["reuse_index"]) > 1 and float(s[signal]) > threshold:
            stopped = True
            out.append(i)
    return out


def trip_effect(steps: Sequence[Mapping[str, Any]], signal: str, threshold: float) -> TripEffect:
    """:class:`TripEffect` of the rule "on a reuse step, trip when ``signal > threshold``" over ``steps`` (dicts
    with ``batch``, ``reuse_index``, ``delta`` and the signal, in step order; the trips: :func:`trip_steps`)."""
    trips = set(trip_steps(steps, signal, threshold))
    stopped = False
    removed = 0
    removed_delta = 0.0
    for i, (s, new) in enumerate(zip(steps, _new_occurrence(steps))):
        stopped = (stopped and not new) or i in trips
        if stopped:
            removed += 1
            removed_delta += float(s["delta"])
    rs = _reuse_steps(steps)
    mean_reuse = statistics.fmean(float(s["delta"]) for s in rs) if rs else 0.0
    return TripEffect(len(trips), removed, removed_delta, removed * mean_reuse)


class HarmOracle:
    """Per optimizer step: the change of an exact held-out metric, beside candidate gate signals.

    Args:
        evaluate: returns the metric for the current weights (e.g. ``lambda: heldout.expected_reward(model)``);
            called once before the first step and once after every step.

    Usage (a run that never gates, so that every step's effect is seen)::

        oracle = HarmOracle(lambda: heldout.expected_reward(model))
        for batch in batches:
            for k in range(1, K + 1):
                for mb in minibatches:
                    loss.backward(); ...
                    oracle.begin_step(batch=i, reuse_index=k, z_energy=z, approx_kl=kl)   # signals as floats
                    opt.step()
                    oracle.end_step()
        signal_auc(oracle.steps, "approx_kl"); trip_effect(oracle.steps, "approx_kl", 0.02)

    Attributes:
        steps: one dict per step: ``batch``, ``reuse_index``, ``before``, ``after``, ``delta`` and the signals.
    """

    def __init__(self, evaluate: Callable[[], float]) -> None:
        self.evaluate = evaluate
        self.steps: list[dict[str, Any]] = []
        self._value: float | None = None
        self._pending: dict[str, Any] | None = None

    def begin_step(self, *, batch: Any, reuse_index: int, **signals: float) -> None:
        """Record the signals of the step about to be taken (call just before ``optimizer.step()``)."""
        if self._pending is not None:
            raise RuntimeError("HarmOracle.begin_step: the previous step has no end_step()")
        if self._value is None:
            self._value = float(self.evaluate())
        self._pending = {"batch": batch, "reuse_index": int(reuse_index), "before": self._value,
                         **{k: float(v) for k, v in signals.items()}}

    def end_step(self) -> dict[str, Any]:
        """Evaluate the metric after the step; append and return the step's entry."""
        if self._pending is None:
            raise RuntimeError("HarmOracle.end_step: call begin_step() first")
        after = float(self.evaluate())
        entry = self._pending
        self._pending = None
        entry["after"] = after
        entry["delta"] = after - entry["before"]
        self._value = after
        self.steps.append(entry)
        return entry

    def auc(self, signal: str) -> float:
        """:func:`signal_auc` over the recorded steps."""
        return signal_auc(self.steps, signal)

    def trip_effect(self, signal: str, threshold: float) -> TripEffect:
        """:func:`trip_effect` over the recorded steps."""
        return trip_effect(self.steps, signal, threshold)
