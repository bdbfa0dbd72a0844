"""Summaries, tables, the pre-registered targets, the signal table and the files of testbed runs (the plots:
:mod:`dgg_fused.demo.plots`).

Definitions (also printed under the table):

* ``J``: the exact expected reward on the fixed held-out prompt set (64 prompts; probability of the accepted
  completion by teacher forcing), recorded after every rollout batch. ``J0`` is the warm start's (the same for
  every arm of a seed). ``final J``: mean of J over the last 5 rollout batches. ``AUC``: area under J vs
  rollouts from 0 to the budget, divided by the budget (the mean J over training).
* ``target``: K=1's final J on the same task, lr and seed, but at least J0 + 0.05 (so a policy that does not
  learn never reaches it). ``rollouts to target``: rollouts at the first batch whose J >= target; a run that
  never gets there counts as the budget and is flagged *censored* (``cens``), never dropped.
* ``x K=1``: ratio of means, mean rollouts-to-target of K=1 / of the arm (> 1: fewer rollouts), censored
  values included. ``dJ vs K=1``: difference of mean final J. Brackets: paired bootstrap 95% CI over seeds
  (2000 resamples, fixed seed).
* secondary: ``greedy`` held-out greedy accuracy at the end; ``sampled`` mean reward of the last 5 rollout
  batches (fresh prompts, temperature 1). ``passes``: mean passes per rollout batch; ``trips``: batches whose
  reuse was stopped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from typing import Any, Iterable, Sequence

from ..monitor import signal_auc, trip_effect
from .run import RunResult
from .stats import (Estimate, area, diff_of_means, first_reach, fraction_of_gain, matched_bootstrap, paired_bootstrap,
                    ratio_of_means)

__all__ = ["summarize", "aggregate", "format_table", "targets", "format_targets", "target_summary",
           "format_target_summary", "signals", "format_signals",
           "write_results", "DEFINITIONS", "TARGET_MARGIN", "FINAL_BATCHES", "SIGNALS",
           "derived_steps", "oracle_fractions", "format_oracle_fractions", "DWD_GROUPS", "weight_change_table",
           "format_weight_change", "signal_targets", "arm_signals", "recommend", "format_signal_targets",
           "format_recommendation", "mean_d_final_vs_k1", "SIGNAL_AUC_TARGET", "ORACLE_SHARE_TARGET",
           "BENIGN_SHARE_TARGET"]

DEFINITIONS = __doc__.split("Definitions (also printed under the table):", 1)[1].strip()
#: The target is at least J0 + TARGET_MARGIN.
TARGET_MARGIN = 0.05
#: ``final`` values average the last FINAL_BATCHES rollout batches.
FINAL_BATCHES = 5
#: Candidate gate signals scored by the harm oracle: (key of the oracle's step records, harm direction). The AUC of
#: a "high" signal ranks steps by the signal; of a "low" one (``ess``: VCPO's effective sample size falls with
#: drift; ``energy_decay``: the lm_head energy relative to the batch's first pass) by its negation, so for every
#: signal AUC > 0.5 means "it sees harm in the direction it is meant to". The older signals keep "high" (their
#: tables read AUC < 0.5 as "low values go with harm").
SIGNALS = (("z_energy", "high"), ("energy", "high"), ("approx_kl", "high"), ("clip_frac", "high"),
           ("ratio_max", "high"), ("grad_norm", "high"), ("reuse_index", "high"), ("ess", "low"),
           ("log_ratio_m2", "high"), ("tv", "high"), ("energy_decay", "low"))


def derived_steps(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The oracle's step records plus the signals derived from them: ``energy_decay`` = the step's lm_head energy /
    the mean energy of the same rollout batch's first-pass (k = 1) steps (None without energies)."""
    first: dict[Any, list[float]] = {}
    for st in steps:
        if st.get("reuse_index") == 1 and st.get("energy") is not None:
            first.setdefault(st["batch"], []).append(float(st["energy"]))
    out = []
    for st in steps:
        d = dict(st)
        base = first.get(st["batch"])
        e = st.get("energy")
        d["energy_decay"] = (float(e) / statistics.fmean(base)) if base and e is not None and statistics.fmean(base) > 0 else None
        out.append(d)
    return out


def _scored(steps: Sequence[dict[str, Any]], sig: str, direction: str) -> float:
    """AUC of ``sig`` for harmful reuse steps, in the signal's harm direction (nan without the signal)."""
    rows = [s for s in steps if s.get(sig) is not None]
    if not rows:
        return float("nan")
    if direction == "low":
        rows = [{**s, sig: -float(s[sig])} for s in rows]
    return signal_auc(rows, sig)
#: The module groups of the weight-change (DWD) table and plot, in display order (dgg_fused.monitor.DWDMonitor's
#: groups; "lm_head/used" and "/unused": the rows of the tokens the task uses and of all others).
DWD_GROUPS = ("lm_head", "lm_head/used", "lm_head/unused", "attention", "mlp", "norms", "embeddings")


def _dw(group: str) -> str:
    """The summary field of a weight-change group: ``dw_lm_head_used`` for ``lm_head/used``."""
    return "dw_" + group.replace("/", "_")


#: The baselines of the "final J" target.
BASELINES = ("k1", "k2", "kl")


def _final(xs: Sequence[float]) -> float:
    return statistics.fmean(xs[-FINAL_BATCHES:])


def summarize(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per run, with its target (from the ``k1`` run of the same task, lr and seed)."""
    k1 = {(r.task, r.lr, r.seed): _final([h.expected for h in r.history[1:]]) for r in results if r.arm == "k1"}
    rows = []
    for r in results:
        h = r.history
        x = [b.rollouts for b in h]
        j = [b.expected for b in h]
        j0 = j[0]
        base = k1.get((r.task, r.lr, r.seed))
        target = max(base, j0 + TARGET_MARGIN) if base is not None else float("nan")
        reach = first_reach(x, j, target, x[-1]) if base is not None else None
        greedy = [b.greedy for b in h if b.greedy is not None]
        rows.append({
            "task": r.task, "lr": r.lr, "arm": r.arm, "seed": r.seed, "exact": r.exact,
            "j0": j0, "final_j": _final(j[1:]), "auc": area(x, j), "target": target,
            "rollouts_to_target": reach.value if reach else float("nan"),
            "censored": (not reach.reached) if reach else None,
            "greedy": greedy[-1] if greedy else float("nan"),
            "sampled": _final([b.reward for b in h[1:]]),
            "passes": r.counts.passes / max(1, r.counts.rollout_batches),
            "trips": r.counts.trips, "steps_applied": r.counts.steps_applied,
            "steps_attempted": r.counts.steps_attempted,
            **{_dw(g): r.weight_change.get(g, float("nan")) for g in DWD_GROUPS},
            "tied_lm_head": r.tied_lm_head,
        })
    return rows


def _key(r):
    return (r["task"], r["lr"])


def _paired(rows, a: str, b: str, field: str) -> tuple[list[float], list[float]]:
    """Values of ``field`` for arms ``a`` and ``b`` on the seeds where both have a (non-NaN) value."""
    by = {(r["arm"], r["seed"]): r[field] for r in rows if r[field] == r[field]}
    seeds = sorted(s for (arm, s) in by if arm == a and (b, s) in by)
    return [by[(a, s)] for s in seeds], [by[(b, s)] for s in seeds]


def _ms(xs: Iterable[float]) -> tuple[float, float]:
    xs = [x for x in xs if x == x]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(rows: Sequence[dict[str, Any]], arm_order: Sequence[str]) -> list[dict[str, Any]]:
    """Per (task, lr, arm): means, seed sd, and the paired comparisons with ``k1`` (bootstrap CIs)."""
    out = []
    for key in dict.fromkeys(_key(r) for r in rows):
        grp = [r for r in rows if _key(r) == key]
        for arm in arm_order:
            rs = [r for r in grp if r["arm"] == arm]
            if not rs:
                continue
            fj, fj_sd = _ms(r["final_j"] for r in rs)
            rt, _ = _ms(r["rollouts_to_target"] for r in rs)
            a = {"task": key[0], "lr": key[1], "arm": arm, "seeds": len(rs), "exact": all(r["exact"] for r in rs),
                 "j0": _ms(r["j0"] for r in rs)[0], "final_j": fj, "final_j_sd": fj_sd,
                 "auc": _ms(r["auc"] for r in rs)[0], "rollouts_to_target": rt,
                 "censored": sum(bool(r["censored"]) for r in rs if r["censored"] is not None),
                 "greedy": _ms(r["greedy"] for r in rs)[0], "sampled": _ms(r["sampled"] for r in rs)[0],
                 "passes": _ms(r["passes"] for r in rs)[0], "trips": _ms(r["trips"] for r in rs)[0]}
            for name, field, stat, base in (("d_final_vs_k1", "final_j", diff_of_means, "k1"),
                                            ("d_auc_vs_k1", "auc", diff_of_means, "k1"),
                                            ("x_rollouts_vs_k1", "rollouts_to_target", None, "k1")):
                xa, xb = _paired(grp, arm, base, field)
                if not xa:
                    a[name] = Estimate(float("nan"), float("nan"), float("nan"), 0)
                elif stat is None:  # K=1's mean over the arm's: > 1 means fewer rollouts
                    a[name] = paired_bootstrap(xb, xa, ratio_of_means)
                else:
                    a[name] = paired_bootstrap(xa, xb, stat)
            out.append(a)
    return out


def weight_change_table(rows: Sequence[dict[str, Any]], arm_order: Sequence[str]) -> list[dict[str, Any]]:
    """Per (task, lr, arm): the seed mean of each group's relative weight change at the end of the run."""
    out = []
    for key in dict.fromkeys(_key(r) for r in rows):
        for arm in arm_order:
            rs = [r for r in rows if _key(r) == key and r["arm"] == arm]
            if rs:
                out.append({"task": key[0], "lr": key[1], "arm": arm, "seeds": len(rs),
                            "tied": any(r.get("tied_lm_head") for r in rs),
                            **{g: _ms(r[_dw(g)] for r in rs)[0] for g in DWD_GROUPS}})
    return out


def format_weight_change(table: Sequence[dict[str, Any]]) -> str:
    if not table:
        return ""
    groups = [g for g in DWD_GROUPS if any(t[g] == t[g] for t in table)]
    lines = ["| task | lr | arm | seeds | " + " | ".join(groups) + " |", "|" + "---|" * (4 + len(groups))]
    for t in table:
        lines.append(f"| {t['task']} | {t['lr']:g} | {t['arm']} | {t['seeds']} | "
                     + " | ".join(_f(t[g], ".2e") for g in groups) + " |")
    if any(t["tied"] for t in table):
        lines.append("\nlm_head tied to the input embedding: one matrix, counted once as lm_head (no embeddings "
                     "entry); its energy is the shared matrix's gradient.")
    return "\n".join(lines)


def oracle_fractions(rows: Sequence[dict[str, Any]], arm_order: Sequence[str],
                     ceiling: str = "oracle") -> list[dict[str, Any]]:
    """Per (task, lr, arm): the arm's final-J gain over naive and over K=1 as a fraction of the ``ceiling`` arm's
    (ratio of mean differences over the seeds the three runs share, matched bootstrap 95% CI), beside the
    ceiling's own gains. A fraction is NaN ("n/a") where the ceiling's gain over that base has a CI containing 0
    (docs/signals.md)."""
    out = []
    for key in dict.fromkeys(_key(r) for r in rows):
        grp = [r for r in rows if _key(r) == key]
        by = {(r["arm"], r["seed"]): r["final_j"] for r in grp}
        if not any(a == ceiling for a, _ in by):
            continue
        gains = {}
        for base in ("naive", "k1"):
            seeds = sorted(s for a, s in by if a == ceiling and (base, s) in by)
            gains[base] = (paired_bootstrap([by[(ceiling, s)] for s in seeds], [by[(base, s)] for s in seeds],
                                            diff_of_means) if seeds else Estimate(math.nan, math.nan, math.nan, 0))
        for arm in arm_order:
            if arm == ceiling or not any(a == arm for a, _ in by):
                continue
            row: dict[str, Any] = {"task": key[0], "lr": key[1], "arm": arm,
                                   "oracle_gain_vs_naive": gains["naive"], "oracle_gain_vs_k1": gains["k1"]}
            for base in ("naive", "k1"):
                g = gains[base]
                seeds = sorted(s for a, s in by if a == arm and (base, s) in by and (ceiling, s) in by)
                if not seeds or not (g.lo > 0 or g.hi < 0):
                    row[f"fraction_vs_{base}"] = Estimate(math.nan, math.nan, math.nan, len(seeds))
                    continue
                row[f"fraction_vs_{base}"] = matched_bootstrap(
                    [[by[(arm, s)] for s in seeds], [by[(base, s)] for s in seeds], [by[(ceiling, s)] for s in seeds]],
                    fraction_of_gain)
            out.append(row)
    return out


def format_oracle_fractions(fr: Sequence[dict[str, Any]]) -> str:
    if not fr:
        return ""
    lines = ["| task | lr | arm | oracle's gain over naive | share of it [95% CI] | oracle's gain over K=1 | "
             "share of it [95% CI] |", "|" + "---|" * 7]
    for r in fr:
        lines.append(f"| {r['task']} | {r['lr']:g} | {r['arm']} | {r['oracle_gain_vs_naive'].fmt('+.3f')} | "
                     f"{r['fraction_vs_naive'].fmt('.2f') if r['fraction_vs_naive'].value == r['fraction_vs_naive'].value else 'n/a'} | "
                     f"{r['oracle_gain_vs_k1'].fmt('+.3f')} | "
                     f"{r['fraction_vs_k1'].fmt('.2f') if r['fraction_vs_k1'].value == r['fraction_vs_k1'].value else 'n/a'} |")
    return "\n".join(lines)


def _f(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def format_table(agg: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`aggregate`."""
    lines = ["| task | lr | arm | seeds | J0 | final J (± sd) | dJ vs K=1 [95% CI] | AUC | dAUC vs K=1 [95% CI] | "
             "rollouts to target (cens) | x K=1 [95% CI] | greedy | sampled | passes | trips |",
             "|" + "---|" * 15]
    for a in agg:
        lines.append(
            f"| {a['task']}{'' if a['exact'] else ' (lower bound)'} | {a['lr']:g} | {a['arm']} | {a['seeds']} | "
            f"{_f(a['j0'])} | {_f(a['final_j'])} ± {_f(a['final_j_sd'])} | {a['d_final_vs_k1'].fmt('+.3f')} | "
            f"{_f(a['auc'])} | {a['d_auc_vs_k1'].fmt('+.3f')} | {_f(a['rollouts_to_target'], '.0f')} "
            f"({a['censored']}) | {a['x_rollouts_vs_k1'].fmt('.2f')} | {_f(a['greedy'], '.2f')} | "
            f"{_f(a['sampled'], '.2f')} | {_f(a['passes'], '.2f')} | {_f(a['trips'], '.1f')} |")
    return "\n".join(lines)


def targets(rows: Sequence[dict[str, Any]], gate_arm: str) -> list[dict[str, Any]]:
    """The pre-registered targets of a gate arm, per (task, lr). ``benign`` is the lowest lr of the task,
    ``collapse`` the highest.

    * ``final``: its final J is not below the best (highest mean final J) of k1 / k2 / kl by more than the
      paired 95% CI: met when the CI of (gate - best) reaches 0 or above.
    * ``collapse`` (highest lr only): mean final J >= K=1's.
    * ``benign`` (lowest lr only): beats kl on rollouts-to-target: ratio of means kl / gate, met when > 1
      (the CI is reported; ``strict`` when its lower end is > 1 too). Not applicable to ``kl`` itself.
    """
    out = []
    lrs_by_task = _lrs(rows)
    for key in dict.fromkeys(_key(r) for r in rows):
        grp = [r for r in rows if _key(r) == key]
        if not any(r["arm"] == gate_arm for r in grp):
            continue
        best, fin = _vs_best(grp, gate_arm)
        t = {"task": key[0], "lr": key[1], "arm": gate_arm, "best": best}
        if fin is not None:
            t["final"] = fin
            t["final_met"] = fin.hi >= 0.0
        lrs = lrs_by_task[key[0]]
        if len(lrs) > 1 and key[1] == lrs[-1]:
            xa, xb = _paired(grp, gate_arm, "k1", "final_j")
            if xa:
                t["collapse"] = paired_bootstrap(xa, xb, diff_of_means)
                t["collapse_met"] = t["collapse"].value >= 0.0
        if len(lrs) > 1 and key[1] == lrs[0] and gate_arm != "kl":  # kl cannot beat itself: not applicable
            xa, xb = _paired(grp, gate_arm, "kl", "rollouts_to_target")
            if xa:
                t["benign"] = paired_bootstrap(xb, xa, ratio_of_means)
                t["benign_met"] = t["benign"].value > 1.0
                t["benign_strict"] = t["benign"].lo > 1.0
        out.append(t)
    return out


def format_targets(ts: Sequence[dict[str, Any]]) -> str:
    def yn(t, k):
        return "-" if k not in t else ("met" if t[k] else "NOT met")

    lines = ["| task | lr | gate | final J - best of k1/k2/kl [95% CI] (best) | | collapse: final J - K=1 | | "
             "benign: x vs kl on rollouts [95% CI] | |", "|" + "---|" * 9]
    for t in ts:
        lines.append(
            f"| {t['task']} | {t['lr']:g} | {t['arm']} | "
            f"{t['final'].fmt('+.3f') if 'final' in t else '-'} ({t['best']}) | {yn(t, 'final_met')} | "
            f"{t['collapse'].fmt('+.3f') if 'collapse' in t else '-'} | {yn(t, 'collapse_met')} | "
            f"{t['benign'].fmt('.2f') if 'benign' in t else '-'} | {yn(t, 'benign_met')}"
            f"{' (CI > 1)' if t.get('benign_strict') else ''} |")
    return "\n".join(lines)


def target_summary(tgts: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per gate arm: how many of its pre-registered checks are met, and its mean dJ vs K=1 over all (task, lr)
    cells (the tie-break of the recommendation rule in docs/ablation.md)."""
    out = []
    for arm in dict.fromkeys(t["arm"] for t in tgts):
        ts = [t for t in tgts if t["arm"] == arm]
        checks = [t[k] for t in ts for k in ("final_met", "collapse_met", "benign_met") if k in t]
        out.append({"arm": arm, "met": sum(checks), "checks": len(checks),
                    "mean_d_final_vs_k1": _mean_d_vs_k1(rows, arm)[0]})
    return out


def format_target_summary(ts: Sequence[dict[str, Any]]) -> str:
    lines = ["| gate arm | checks met | mean dJ vs K=1 over all cells |", "|---|---|---|"]
    for t in ts:
        lines.append(f"| {t['arm']} | {t['met']}/{t['checks']} | {t['mean_d_final_vs_k1']:+.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ the targets of docs/signals.md
#: docs/signals.md, "Targets": target 1's AUC, target 2's share of the oracle's gain over naive, target 3's share of
#: naive K=4's rollouts-to-target gain over K=1.
SIGNAL_AUC_TARGET = 0.70
ORACLE_SHARE_TARGET = 0.5
BENIGN_SHARE_TARGET = 0.9
_TRIP_TO_HARM = {"above": "high", "below": "low"}


def arm_signals(arm: str, gate: Any = None, target_kl: float = 0.02) -> list[tuple[str, str]]:
    """The signals a gate arm trips on, as ``(signal-table key, trip direction "high"/"low")``, from its spec
    (parsed by :func:`dgg_fused.demo.arms.parse_arm` from ``gate``, the run's GateConfig, default the paper's).

    ``kl`` (the host KL stop) and a drift gate on ``approx_kl`` (``klgate``) -> ``approx_kl``; a ``drift=X`` gate ->
    ``X`` (``ess``, ``log_ratio_m2``, ``tv``, ``energy_decay``, ..., whatever its action); the energy rule (``dgg``)
    -> ``z_energy``, the energy Z-score as the signal table names it; a gate with both rules (``dgg-or-kl``) ->
    both. Empty for an arm that is not a gate or whose spec does not parse."""
    from .. import GateConfig
    from .arms import Gated, HostKLStop, parse_arm

    try:
        a = parse_arm(arm, gate if gate is not None else GateConfig(), target_kl)
    except (ValueError, TypeError):
        return []
    if isinstance(a, HostKLStop):
        return [("approx_kl", "high")]
    if not isinstance(a, Gated):
        return []
    out = []
    if a.gate.energy:
        out.append(("z_energy", "high"))  # the paper's rule trips on a high Z-score
    if a.gate.drift is not None:
        out.append((a.gate.drift, _TRIP_TO_HARM[a.gate.trip_direction]))
    return out


def _lrs(rows: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    out: dict[str, set[float]] = {}
    for r in rows:
        out.setdefault(r["task"], set()).add(r["lr"])
    return {t: sorted(v) for t, v in out.items()}


def _nan_est(n: int = 0) -> Estimate:
    return Estimate(math.nan, math.nan, math.nan, n)


def _vs_best(grp: Sequence[dict[str, Any]], arm: str) -> tuple[str | None, Estimate | None]:
    """The best (highest mean final J) of :data:`BASELINES` in a cell, and the paired CI of (arm - best)."""
    means = {b: _ms(r["final_j"] for r in grp if r["arm"] == b)[0] for b in BASELINES}
    means = {b: m for b, m in means.items() if m == m}
    best = max(means, key=means.get) if means else None
    if best is None:
        return None, None
    xa, xb = _paired(grp, arm, best, "final_j")
    return best, (paired_bootstrap(xa, xb, diff_of_means) if xa else None)


def _mean_d_vs_k1(rows: Sequence[dict[str, Any]], arm: str) -> tuple[float, int]:
    """Mean over the (task, lr) cells of (mean final J of ``arm`` - of K=1, on their shared seeds), and the
    number of cells that entered it."""
    d = []
    for key in dict.fromkeys(_key(r) for r in rows):
        xa, xb = _paired([r for r in rows if _key(r) == key], arm, "k1", "final_j")
        if xa:
            d.append(diff_of_means(xa, xb))
    return (statistics.fmean(d) if d else float("nan")), len(d)


def mean_d_final_vs_k1(rows: Sequence[dict[str, Any]], arm: str) -> float:
    """The recommendation rules' tie-break: the mean over all (task, lr) cells of the arm's mean final-J
    difference to K=1 (on the seeds they share; a cell without both arms is left out). NaN without any."""
    return _mean_d_vs_k1(rows, arm)[0]


def _benign_margin(k1: Sequence[float], naive: Sequence[float], gate: Sequence[float]) -> float:
    """(ratio_gate - 1) - 0.9 (ratio_naive - 1), ratio = mean rollouts-to-target of K=1 / of the arm."""
    return (ratio_of_means(k1, gate) - 1.0) - BENIGN_SHARE_TARGET * (ratio_of_means(k1, naive) - 1.0)


def signal_targets(rows: Sequence[dict[str, Any]], sig: Sequence[dict[str, Any]], gate_arm: str, *,
                   fractions: Sequence[dict[str, Any]] | None = None, gate: Any = None, target_kl: float = 0.02,
                   harm_arm: str = "naive", ceiling: str = "oracle") -> dict[str, Any]:
    """The four targets of docs/signals.md for one gate arm, counted per task / cell as its recommendation rule
    counts them (``rows``: :func:`summarize`; ``sig``: :func:`signals`; ``fractions``: :func:`oracle_fractions`,
    computed here when None). ``collapse`` is each task's highest lr, ``benign`` its lowest, as in
    :func:`targets`. An arm with no runs in a cell fails that cell's checks ("no runs"); the number of checks is
    fixed by the grid (1 + tasks + tasks + cells), never by the arm's own runs.

    * ``t1`` (1 check), signal: the arm's signal (:func:`arm_signals`) has a harm-oracle AUC (``harm_arm``'s step
      records, mean over seeds, in the direction the arm trips) >= 0.70 in the collapse cell of at least 2/3 of the
      tasks (rounded up: 2 of 3). A gate on two signals (``dgg-or-kl``) counts, per task, the lower of its two
      AUCs (neither alone is the combined rule's AUC; the check is met only where both signals see harm); both are
      reported. A signal the table lacks counts as not met.
    * ``t2`` (1 check per task), collapse: the paired 95% CI of (arm - K=1) on final J reaches 0 (``hi >= 0``) AND
      the arm's share of the oracle's gain over naive (ratio of means, :func:`oracle_fractions`) is >= 0.5. The
      share is "n/a" — the check not met — where the oracle's gain's CI contains 0 or lies below 0 (the ceiling
      gains nothing to take a share of).
    * ``t3`` (1 check per task), benign: (ratio_arm - 1) >= 0.9 (ratio_naive - 1), ratio = mean rollouts-to-target
      of K=1 / of the arm (censored runs at the budget), on the seeds K=1, naive and the arm share; the CI is of the
      margin (ratio_arm - 1) - 0.9 (ratio_naive - 1) (matched bootstrap); met on its point value.
    * ``t4`` (1 check per cell), no regression: the paired 95% CI of (arm - best of k1 / k2 / kl by mean final J)
      reaches 0 (the ``final`` check of :func:`targets`).

    Returns a dict with ``arm``, ``signals`` (the arm's signal keys), ``t1`` / ``t2`` / ``t3`` / ``t4`` (their
    per-task / per-cell records, each with ``met``), ``met`` / ``checks`` (totals), ``per_target`` ({"T1": (met,
    checks), ...}), ``all_met`` (every check of every target) and ``mean_d_final_vs_k1`` (the tie-break: the mean
    over all cells of the mean final-J difference to K=1)."""
    lrs = _lrs(rows)
    tasks = list(lrs)
    cells = [(t, lr) for t in tasks for lr in lrs[t]]  # tasks in order of appearance, each by lr
    by_cell: dict[tuple, list] = {}
    for r in rows:
        by_cell.setdefault(_key(r), []).append(r)

    # ---- T1: the signal
    sigs = arm_signals(gate_arm, gate, target_kl)
    sig_rows = {(s["task"], s["lr"]): s for s in sig if s.get("arm", harm_arm) == harm_arm}
    t1_tasks = []
    for task in tasks:
        s = sig_rows.get((task, lrs[task][-1]))
        aucs = {}
        for name, direction in sigs:
            v = s.get(f"auc:{name}", (math.nan,))[0] if s else math.nan
            scored = dict(SIGNALS).get(name)
            if v == v and scored is not None and scored != direction:  # the arm trips the other way round
                v = 1.0 - v
            aucs[name] = v if scored is not None else math.nan
        counted = min(aucs.values()) if aucs and all(v == v for v in aucs.values()) else math.nan
        t1_tasks.append({"task": task, "lr": lrs[task][-1], "aucs": aucs, "auc": counted,
                         "met": counted == counted and counted >= SIGNAL_AUC_TARGET})
    need = math.ceil(2 * len(tasks) / 3)
    n_ok = sum(t["met"] for t in t1_tasks)
    t1 = {"tasks": t1_tasks, "tasks_met": n_ok, "needed": need, "met": bool(tasks) and bool(sigs) and n_ok >= need,
          "note": "" if sigs else "no signal known for this arm"}

    # ---- T2: collapse
    if fractions is None:
        fractions = oracle_fractions(
            [r for r in rows if r["lr"] == lrs[r["task"]][-1] and r["arm"] in (gate_arm, "naive", "k1", ceiling)],
            [gate_arm], ceiling)
    frac = {(f["task"], f["lr"]): f for f in fractions if f["arm"] == gate_arm}
    t2 = []
    for task in tasks:
        key = (task, lrs[task][-1])
        grp = by_cell.get(key, [])
        rec: dict[str, Any] = {"task": task, "lr": key[1], "d_vs_k1": None, "not_below_k1": False,
                               "fraction_vs_naive": None, "oracle_gain_vs_naive": None, "share_met": False,
                               "met": False, "note": ""}
        if not any(r["arm"] == gate_arm for r in grp):
            rec["note"] = "no runs"
            t2.append(rec)
            continue
        xa, xb = _paired(grp, gate_arm, "k1", "final_j")
        if xa:
            rec["d_vs_k1"] = paired_bootstrap(xa, xb, diff_of_means)
            rec["not_below_k1"] = rec["d_vs_k1"].hi >= 0.0
        f = frac.get(key)
        notes = [] if xa else ["no K=1 runs on its seeds"]
        if f is None:
            notes.append("no oracle runs")
        else:
            g, fr = f["oracle_gain_vs_naive"], f["fraction_vs_naive"]
            rec["oracle_gain_vs_naive"], rec["fraction_vs_naive"] = g, fr
            if not g.lo > 0:  # CI contains 0 or lies below it: no gain to take a share of
                rec["fraction_vs_naive"] = _nan_est(fr.n)
                notes.append("share n/a: the oracle's gain over naive is not above 0 (95% CI)")
            elif fr.value != fr.value:
                notes.append("share n/a: no seeds shared by the arm, naive and the oracle")
            else:
                rec["share_met"] = fr.value >= ORACLE_SHARE_TARGET
        rec["met"] = rec["not_below_k1"] and rec["share_met"]
        rec["note"] = "; ".join(notes)
        t2.append(rec)

    # ---- T3: benign
    t3 = []
    for task in tasks:
        key = (task, lrs[task][0])
        grp = by_cell.get(key, [])
        rec = {"task": task, "lr": key[1], "ratio_arm": math.nan, "ratio_naive": math.nan, "margin": None,
               "met": False, "note": ""}
        by = {(r["arm"], r["seed"]): r["rollouts_to_target"] for r in grp if r["rollouts_to_target"] == r["rollouts_to_target"]}
        seeds = sorted(s for a, s in by if a == gate_arm and ("k1", s) in by and ("naive", s) in by)
        if not any(r["arm"] == gate_arm for r in grp):
            rec["note"] = "no runs"
        elif not seeds:
            rec["note"] = "no K=1 and naive runs on its seeds"
        else:
            k1, nv, ga = ([by[(a, s)] for s in seeds] for a in ("k1", "naive", gate_arm))
            rec["ratio_arm"], rec["ratio_naive"] = ratio_of_means(k1, ga), ratio_of_means(k1, nv)
            rec["margin"] = matched_bootstrap([k1, nv, ga], _benign_margin)
            rec["met"] = rec["margin"].value == rec["margin"].value and rec["margin"].value >= 0.0
        t3.append(rec)

    # ---- T4: no regression
    t4 = []
    for key in cells:
        grp = by_cell[key]
        rec = {"task": key[0], "lr": key[1], "best": None, "d_vs_best": None, "met": False, "note": ""}
        if not any(r["arm"] == gate_arm for r in grp):
            rec["note"] = "no runs"
        else:
            rec["best"], rec["d_vs_best"] = _vs_best(grp, gate_arm)
            if rec["d_vs_best"] is None:
                rec["note"] = "no baseline runs on its seeds"
            else:
                rec["met"] = rec["d_vs_best"].hi >= 0.0
        t4.append(rec)

    per = {"T1": (int(t1["met"]), 1), "T2": (sum(r["met"] for r in t2), len(t2)),
           "T3": (sum(r["met"] for r in t3), len(t3)), "T4": (sum(r["met"] for r in t4), len(t4))}
    mean_d, n_d = _mean_d_vs_k1(rows, gate_arm)
    return {"arm": gate_arm, "signals": [s for s, _ in sigs], "t1": t1, "t2": t2, "t3": t3, "t4": t4,
            "per_target": per, "met": sum(m for m, _ in per.values()), "checks": sum(c for _, c in per.values()),
            "all_met": all(m == c for m, c in per.values()), "mean_d_final_vs_k1": mean_d, "cells_vs_k1": n_d}


def _misses(st: dict[str, Any]) -> list[str]:
    """What an arm's record of :func:`signal_targets` misses, in words."""
    out = []
    t1 = st["t1"]
    if not t1["met"]:
        out.append(f"T1 signal (AUC >= {SIGNAL_AUC_TARGET:.2f} on {t1['tasks_met']}/{len(t1['tasks'])} tasks, "
                   f"needs {t1['needed']}" + (f"; {t1['note']}" if t1["note"] else "") + ")")
    for name, key in (("T2 collapse", "t2"), ("T3 benign", "t3"), ("T4 no regression", "t4")):
        bad = [f"{r['task']}" + (f" lr {r['lr']:g}" if key == "t4" else "") for r in st[key] if not r["met"]]
        if bad:
            out.append(f"{name}: " + ", ".join(bad))
    return out


def recommend(sts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """docs/signals.md's recommendation rule over :func:`signal_targets` records: the arm meeting the most checks,
    ties broken by the higher mean final-J difference to K=1 over all cells (a NaN tie-break ranks last). Returns
    ``arm`` (None without candidates), ``tied`` (the arms equal to it on both counts, itself included; more than
    one means the rule does not decide), ``met`` / ``checks``, ``mean_d_final_vs_k1``, ``all_met`` (whether it
    meets all four targets), ``all_met_arms`` (every arm that does) and ``misses`` (what it misses, in words)."""
    if not sts:
        return {"arm": None, "tied": [], "met": 0, "checks": 0, "mean_d_final_vs_k1": math.nan, "all_met": False,
                "all_met_arms": [], "misses": []}

    def rank(st):
        d = st["mean_d_final_vs_k1"]
        return (st["met"], d if d == d else -math.inf)

    best = max(sts, key=rank)  # the first of equals, in the given order
    return {"arm": best["arm"], "tied": [s["arm"] for s in sts if rank(s) == rank(best)], "met": best["met"],
            "checks": best["checks"], "mean_d_final_vs_k1": best["mean_d_final_vs_k1"], "all_met": best["all_met"],
            "all_met_arms": [s["arm"] for s in sts if s["all_met"]], "misses": _misses(best)}


def _yn(ok: bool) -> str:
    return "met" if ok else "NOT met"


def format_signal_targets(sts: Sequence[dict[str, Any]], rec: dict[str, Any] | None = None,
                          aliases: dict[str, str] | None = None, oracle_d_vs_k1: float | None = None) -> str:
    """Markdown of :func:`signal_targets` records (a count per arm, then every check) and of :func:`recommend`'s
    answer. ``aliases``: optional short display names ({arm spec: alias}; the spec is listed under the table);
    ``oracle_d_vs_k1``: the oracle's mean final-J difference to K=1, printed beside the recommendation as the
    ceiling."""
    if not sts:
        return ""
    al = aliases or {}

    def name(a):
        return al.get(a, a)

    def cnt(st, t):
        m, c = st["per_target"][t]
        return f"{m}/{c}"

    lines = ["| gate arm | signal | T1 signal | T2 collapse | T3 benign | T4 no regression | checks met | "
             "all four | mean dJ vs K=1 over all cells |", "|" + "---|" * 9]
    for st in sts:
        lines.append(f"| {name(st['arm'])} | {', '.join(st['signals']) or '-'} | {cnt(st, 'T1')} | {cnt(st, 'T2')} | "
                     f"{cnt(st, 'T3')} | {cnt(st, 'T4')} | {st['met']}/{st['checks']} | "
                     f"{'yes' if st['all_met'] else 'no'} | {_f(st['mean_d_final_vs_k1'], '+.3f')} |")
    used = [a for a in dict.fromkeys(st["arm"] for st in sts) if a in al]
    if used:
        lines += [""] + [f"* {al[a]} = `{a}`" for a in used]

    lines += ["", f"T1 — AUC of the arm's signal for harmful reuse steps at each task's highest lr (harm oracle, mean "
                  f"over seeds; two signals: the lower counts); met at >= {SIGNAL_AUC_TARGET:.2f} on >= 2/3 of the "
                  "tasks:", "", "| gate arm | " + " | ".join(t["task"] for t in sts[0]["t1"]["tasks"])
              + " | tasks met | |", "|" + "---|" * (3 + len(sts[0]["t1"]["tasks"]))]
    for st in sts:
        cells = []
        for t in st["t1"]["tasks"]:
            parts = [f"{k} {_f(v, '.2f')}" for k, v in t["aucs"].items()]
            cells.append(", ".join(parts) if parts else "-")
        t1 = st["t1"]
        lines.append(f"| {name(st['arm'])} | " + " | ".join(cells)
                     + f" | {t1['tasks_met']}/{len(t1['tasks'])} (needs {t1['needed']}) | {_yn(t1['met'])} |")

    lines += ["", "T2 — collapse (each task's highest lr): final J - K=1 (paired 95% CI; met when it reaches 0) and "
                  f"the share of the oracle's gain over naive (>= {ORACLE_SHARE_TARGET:.2f}; n/a where the oracle's "
                  "gain's CI is not above 0):", "",
              "| gate arm | task | lr | final J - K=1 [95% CI] | | oracle's gain over naive | share [95% CI] | | "
              "check | note |", "|" + "---|" * 10]
    for st in sts:
        for r in st["t2"]:
            fr = r["fraction_vs_naive"]
            share = "-" if fr is None else (fr.fmt(".2f") if fr.value == fr.value else "n/a")
            lines.append(f"| {name(st['arm'])} | {r['task']} | {r['lr']:g} | "
                         f"{r['d_vs_k1'].fmt('+.3f') if r['d_vs_k1'] is not None else '-'} | "
                         f"{_yn(r['not_below_k1'])} | "
                         f"{r['oracle_gain_vs_naive'].fmt('+.3f') if r['oracle_gain_vs_naive'] is not None else '-'} | "
                         f"{share} | {_yn(r['share_met'])} | {_yn(r['met'])} | {r['note']} |")

    lines += ["", "T3 — benign (each task's lowest lr): x K=1 on rollouts-to-target (ratio of means on the seeds K=1, "
                  f"naive and the arm share); met when (x_arm - 1) >= {BENIGN_SHARE_TARGET:g} (x_naive - 1):", "",
              f"| gate arm | task | lr | x_arm | x_naive | margin (x_arm - 1) - {BENIGN_SHARE_TARGET:g} (x_naive - 1) "
              "[95% CI] | check | note |", "|" + "---|" * 8]
    for st in sts:
        for r in st["t3"]:
            lines.append(f"| {name(st['arm'])} | {r['task']} | {r['lr']:g} | {_f(r['ratio_arm'], '.2f')} | "
                         f"{_f(r['ratio_naive'], '.2f')} | "
                         f"{r['margin'].fmt('+.2f') if r['margin'] is not None else '-'} | {_yn(r['met'])} | "
                         f"{r['note']} |")

    lines += ["", "T4 — no regression (every cell): final J - best of K=1 / K=2 / KL stop (paired 95% CI; met when it "
                  "reaches 0):", "", "| gate arm | " + " | ".join(f"{r['task']} {r['lr']:g}" for r in sts[0]["t4"])
              + " |", "|" + "---|" * (1 + len(sts[0]["t4"]))]
    for st in sts:
        lines.append(f"| {name(st['arm'])} | " + " | ".join(
            (f"{r['d_vs_best'].fmt('+.3f')} ({r['best']}) {'met' if r['met'] else 'NOT met'}"
             if r["d_vs_best"] is not None else f"NOT met ({r['note']})") for r in st["t4"]) + " |")
    if rec is not None:
        lines += ["", format_recommendation(rec, aliases, oracle_d_vs_k1)]
    return "\n".join(lines)


def format_recommendation(rec: dict[str, Any], aliases: dict[str, str] | None = None,
                          oracle_d_vs_k1: float | None = None) -> str:
    """:func:`recommend`'s answer in words."""
    al = aliases or {}
    if rec["arm"] is None:
        return "Recommendation: no gate arm to choose from."
    ceiling = (f" The oracle's ceiling (not a method): mean dJ vs K=1 over all cells {oracle_d_vs_k1:+.3f}."
               if oracle_d_vs_k1 is not None and oracle_d_vs_k1 == oracle_d_vs_k1 else "")
    if len(rec["tied"]) > 1:
        head = ("Recommendation: undecided — " + ", ".join(f"`{al.get(a, a)}`" for a in rec["tied"])
                + f" tie at {rec['met']}/{rec['checks']} checks and mean dJ vs K=1 {_f(rec['mean_d_final_vs_k1'], '+.3f')}.")
    else:
        head = (f"Recommendation: `{al.get(rec['arm'], rec['arm'])}`, {rec['met']}/{rec['checks']} checks met "
                f"(mean dJ vs K=1 over all cells {_f(rec['mean_d_final_vs_k1'], '+.3f')}).")
    if rec["all_met_arms"]:
        allm = "Arms meeting all four targets: " + ", ".join(f"`{al.get(a, a)}`" for a in rec["all_met_arms"]) + "."
    else:
        allm = "No arm meets all four targets."
    miss = (" It misses: " + "; ".join(rec["misses"]) + ".") if rec["misses"] else ""
    return f"{head} {allm}{miss}{ceiling}"


def signals(results: Sequence[RunResult], thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """Per (task, lr): each candidate signal's AUC for harmful reuse steps (mean over seeds, min, max), and the
    effect of removing the trips of the threshold rules in ``thresholds`` ({signal: threshold})."""
    out = []
    obs = [r for r in results if r.steps]
    for key in dict.fromkeys((r.task, r.lr) for r in obs):
        runs = [r for r in obs if (r.task, r.lr) == key]
        reuse = [s for r in runs for s in r.steps if s["reuse_index"] > 1]
        row: dict[str, Any] = {"task": key[0], "lr": key[1], "arm": runs[0].arm, "seeds": len(runs),
                               "reuse_steps": len(reuse) / len(runs),
                               "harmful": statistics.fmean(s["delta"] < 0 for s in reuse) if reuse else float("nan"),
                               "mean_delta_reuse": statistics.fmean(s["delta"] for s in reuse) if reuse else float("nan"),
                               "mean_delta_first": statistics.fmean(
                                   s["delta"] for r in runs for s in r.steps if s["reuse_index"] == 1)}
        for sig, direction in SIGNALS:
            aucs = [_scored(derived_steps(r.steps), sig, direction) for r in runs]
            aucs = [a for a in aucs if a == a]
            row[f"auc:{sig}"] = (statistics.fmean(aucs), min(aucs), max(aucs)) if aucs else (float("nan"),) * 3
        for sig, thr in thresholds.items():
            effs = [trip_effect(r.steps, sig, thr) for r in runs]
            row[f"trip:{sig}>{thr:g}"] = {
                "trips": statistics.fmean(e.trips for e in effs),
                "removed_steps": statistics.fmean(e.removed_steps for e in effs),
                "removed_delta": statistics.fmean(e.removed_delta for e in effs),
                "random_delta": statistics.fmean(e.random_delta for e in effs),
            }
        out.append(row)
    return out


def format_signals(sig: Sequence[dict[str, Any]]) -> str:
    if not sig:
        return ""
    names = [s for s, _ in SIGNALS]
    lines = ["| task | lr | seeds | reuse steps/run | harmful | mean dJ reuse / first-pass step | "
             + " | ".join(f"AUC {s}{' (low)' if d == 'low' else ''}" for s, d in SIGNALS) + " |",
             "|" + "---|" * (6 + len(SIGNALS))]
    for r in sig:
        aucs = " | ".join(f"{r[f'auc:{s}'][0]:.2f} ({r[f'auc:{s}'][1]:.2f}–{r[f'auc:{s}'][2]:.2f})"
                          if r[f'auc:{s}'][0] == r[f'auc:{s}'][0] else "-" for s in names)
        lines.append(f"| {r['task']} | {r['lr']:g} | {r['seeds']} | {r['reuse_steps']:.0f} | {r['harmful']:.2f} | "
                     f"{r['mean_delta_reuse']:+.4f} / {r['mean_delta_first']:+.4f} | {aucs} |")
    trip_keys = [k for k in sig[0] if k.startswith("trip:")]
    if trip_keys:
        lines += ["", "| task | lr | rule | trips/run | removed steps/run | dJ of removed steps/run | "
                      "same number of steps at the mean reuse dJ |", "|" + "---|" * 7]
        for r in sig:
            for k in trip_keys:
                e = r[k]
                lines.append(f"| {r['task']} | {r['lr']:g} | {k[5:]} | {e['trips']:.1f} | {e['removed_steps']:.1f} | "
                             f"{e['removed_delta']:+.3f} | {e['random_delta']:+.3f} |")
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Estimate):
        return {"value": x.value, "lo": x.lo, "hi": x.hi, "n": x.n}
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_results(out: str, meta: dict[str, Any], rows, agg, sig, tgts, text: str, fractions=(),
                  weight_change=(), signal_targets: dict[str, Any] | None = None) -> list[str]:
    """results.json (meta, per-run summary, table, signals, targets, shares of the oracle's gain, weight-change
    table and, when given, docs/signals.md's targets under ``signal_targets``: ``{"arms": [signal_targets(...)
    per gate arm], "recommendation": recommend(...)}``), summary.csv and report.md under ``out``."""
    os.makedirs(out, exist_ok=True)
    paths = []
    p = os.path.join(out, "results.json")
    doc = {"meta": meta, "summary": rows, "table": agg, "signals": sig, "targets": tgts,
           "oracle_fractions": list(fractions), "weight_change": list(weight_change)}
    if signal_targets is not None:
        doc["signal_targets"] = signal_targets
    with open(p, "w") as f:
        json.dump(_jsonable(doc), f, indent=1)
    paths.append(p)
    p = os.path.join(out, "summary.csv")
    with open(p, "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    paths.append(p)
    p = os.path.join(out, "report.md")
    with open(p, "w") as f:
        f.write(text + "\n")
    paths.append(p)
    return paths
