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
           "format_weight_change"]

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
    lrs_by_task: dict[str, list[float]] = {}
    for r in rows:
        lrs_by_task.setdefault(r["task"], []).append(r["lr"])
    for key in dict.fromkeys(_key(r) for r in rows):
        grp = [r for r in rows if _key(r) == key]
        if not any(r["arm"] == gate_arm for r in grp):
            continue
        means = {b: _ms(r["final_j"] for r in grp if r["arm"] == b)[0] for b in BASELINES}
        means = {b: m for b, m in means.items() if m == m}
        best = max(means, key=means.get) if means else None
        t = {"task": key[0], "lr": key[1], "arm": gate_arm, "best": best}
        if best and _paired(grp, gate_arm, best, "final_j")[0]:
            xa, xb = _paired(grp, gate_arm, best, "final_j")
            t["final"] = paired_bootstrap(xa, xb, diff_of_means)
            t["final_met"] = t["final"].hi >= 0.0
        lrs = sorted(set(lrs_by_task[key[0]]))
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
        d = []
        for key in dict.fromkeys(_key(r) for r in rows):
            grp = [r for r in rows if _key(r) == key]
            xa, xb = _paired(grp, arm, "k1", "final_j")
            if xa:
                d.append(diff_of_means(xa, xb))
        out.append({"arm": arm, "met": sum(checks), "checks": len(checks),
                    "mean_d_final_vs_k1": statistics.fmean(d) if d else float("nan")})
    return out


def format_target_summary(ts: Sequence[dict[str, Any]]) -> str:
    lines = ["| gate arm | checks met | mean dJ vs K=1 over all cells |", "|---|---|---|"]
    for t in ts:
        lines.append(f"| {t['arm']} | {t['met']}/{t['checks']} | {t['mean_d_final_vs_k1']:+.3f} |")
    return "\n".join(lines)


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
                  weight_change=()) -> list[str]:
    """results.json (meta, per-run summary, table, signals, targets, shares of the oracle's gain, weight-change
    table), summary.csv and report.md under ``out``."""
    os.makedirs(out, exist_ok=True)
    paths = []
    p = os.path.join(out, "results.json")
    with open(p, "w") as f:
        json.dump(_jsonable({"meta": meta, "summary": rows, "table": agg, "signals": sig, "targets": tgts,
                             "oracle_fractions": list(fractions), "weight_change": list(weight_change)}), f, indent=1)
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
