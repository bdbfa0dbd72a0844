"""The testbed's plots, written next to the report's tables (``--no-plots`` skips them; ``--from-runs`` redraws
them from runs.jsonl files), the same for every policy:

* ``expected_reward.png`` — the exact expected reward J vs rollouts per arm (seed mean), one panel per (task, lr);
* ``weight_change.png`` — DWD, the paper's premise: the relative weight change ``||W - W0|| / ||W0||`` per module
  group at the end of each run (:class:`dgg_fused.monitor.DWDMonitor`; lm_head, its used and unused rows,
  attention, MLP, norms, embeddings), per arm (seed mean; the bars span the seeds' min–max), log scale, one panel per
  (task, lr). A tied lm_head (the pretrained policy) is the embedding matrix, counted once and labelled so;
* ``signals.png`` — the signal traces of one observed run per (task, lr) (``--observe``; the first seed of the first
  observed arm), per optimizer step: held-out J after the step, the lm_head energy, its Z-score as the paper's gate
  computes it (threshold tau), approximate KL (threshold target_kl), the ESS of the importance weights and the clip
  fraction. Reuse passes (k > 1) are shaded; on every panel the harm oracle's harmful reuse steps (dJ < 0) are red
  crosses; on the Z-score and KL panels a triangle marks each trip of the threshold rule
  (:func:`dgg_fused.monitor.trip_steps`: a batch's first reuse step above the threshold). An observed run never
  gates (its gate only watches), so the later steps of a tripped batch are still there: what the rule would have
  removed.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any, Mapping, Sequence

from ..monitor import trip_steps
from .report import DWD_GROUPS

__all__ = ["write_plots", "plot_curves", "plot_weight_change", "plot_signals", "SIGNAL_PANELS"]
#: The panels of signals.png: (key of the harm oracle's step records, label, log scale, threshold key).
SIGNAL_PANELS = (("after", "held-out J\nafter the step", False, None),
                 ("energy", "lm_head energy\n||g||² (pre-clip)", True, None),
                 ("z_energy", "energy Z-score\n(paper's gate)", False, "z_energy"),
                 ("approx_kl", "approx KL", False, "approx_kl"),
                 ("ess", "ESS", False, None),
                 ("clip_frac", "clip fraction", False, None))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cells(results) -> list[tuple[str, float]]:
    return list(dict.fromkeys((r.task, r.lr) for r in results))


def _save(fig, out: str, name: str) -> str:
    p = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(p, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return p


def plot_curves(out: str, results: Sequence, arm_order: Sequence[str]) -> str:
    """expected_reward.png: mean exact expected reward vs rollouts per arm, one panel per (task, lr)."""
    plt = _pyplot()
    keys = _cells(results)
    tasks = list(dict.fromkeys(k[0] for k in keys))
    lrs = sorted({k[1] for k in keys})
    fig, axes = plt.subplots(len(tasks), len(lrs), figsize=(5 * len(lrs), 3.6 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            for arm in arm_order:
                runs = [r for r in results if (r.task, r.lr, r.arm) == (task, lr, arm)]
                if not runs:
                    continue
                x = [b.rollouts for b in runs[0].history]
                y = [statistics.fmean(v) for v in zip(*[[b.expected for b in r.history] for r in runs])]
                ax.plot(x, y, label=arm)
            ax.set_title(f"{task}, lr {lr:g}: exact expected reward (seed mean)", fontsize=9)
            ax.set_xlabel("rollouts")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, out, "expected_reward.png")


def plot_weight_change(out: str, results: Sequence, arm_order: Sequence[str]) -> str:
    """weight_change.png: relative weight change per module group and arm (see the module doc)."""
    plt = _pyplot()
    cells = _cells(results)
    seen = list(dict.fromkeys(g for r in results for g in r.weight_change))
    groups = [g for g in DWD_GROUPS if g in seen] + [g for g in seen if g not in DWD_GROUPS]  # e.g. "other"
    arms = [a for a in arm_order if any(r.arm == a for r in results)]
    fig, axes = plt.subplots(len(cells), 1, figsize=(max(6.0, 0.35 * len(groups) * max(2, len(arms))),
                                                     3.6 * len(cells)), squeeze=False)
    width = 0.8 / max(1, len(arms))
    for ax, (task, lr) in zip(axes[:, 0], cells):
        runs = [r for r in results if (r.task, r.lr) == (task, lr)]
        tied = any(r.tied_lm_head for r in runs)
        for i, arm in enumerate(arms):
            rs = [r for r in runs if r.arm == arm]
            if not rs:
                continue
            vals = [[r.weight_change.get(g, math.nan) for r in rs] for g in groups]
            mean = [statistics.fmean(v) if all(x == x for x in v) else math.nan for v in vals]
            lo = [m - min(v) if m == m else 0.0 for m, v in zip(mean, vals)]
            hi = [max(v) - m if m == m else 0.0 for m, v in zip(mean, vals)]
            xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(groups))]
            ax.bar(xs, mean, width, yerr=[lo, hi] if len(rs) > 1 else None, label=arm, capsize=2)
        labels = [("lm_head\n(tied: = embedding)" if tied else g) if g == "lm_head" else g.replace("/", "\n")
                  for g in groups]
        ax.set_xticks(range(len(groups)), labels, fontsize=7)
        if any(v > 0 for r in runs for v in r.weight_change.values()):  # a run that never moved has nothing to log
            ax.set_yscale("log")
        ax.set_ylabel("||W - W0|| / ||W0||", fontsize=8)
        seeds = len({r.seed for r in runs})
        ax.set_title(f"{task}, lr {lr:g}: relative weight change at the end of the run "
                     f"({'mean of ' + str(seeds) + ' seeds, bars: min–max' if seeds > 1 else '1 seed'})", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    return _save(fig, out, "weight_change.png")


def _values(steps: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(s[key]) if s.get(key) is not None else math.nan for s in steps]


def plot_signals(out: str, results: Sequence, thresholds: Mapping[str, float]) -> str | None:
    """signals.png: the signal traces of one observed run per (task, lr) (see the module doc); None when no run
    was observed."""
    observed = [r for r in results if r.steps]
    if not observed:
        return None
    plt = _pyplot()
    runs = []
    for cell in _cells(observed):
        rs = [r for r in observed if (r.task, r.lr) == cell]
        runs.append(min(rs, key=lambda r: r.seed))  # the first observed arm's first seed
    panels = [p for p in SIGNAL_PANELS if any(s.get(p[0]) is not None for r in runs for s in r.steps)]
    fig, axes = plt.subplots(len(panels), len(runs), figsize=(7 * len(runs), 1.9 * len(panels)), squeeze=False,
                             sharex="col")
    for j, r in enumerate(runs):
        steps = r.steps
        x = list(range(len(steps)))
        harmful = [i for i, s in enumerate(steps) if int(s["reuse_index"]) > 1 and float(s["delta"]) < 0]
        spans, start = [], None  # runs of consecutive reuse steps
        for i, s in enumerate(steps + [{"reuse_index": 1}]):
            if int(s["reuse_index"]) > 1 and start is None:
                start = i
            elif int(s["reuse_index"]) == 1 and start is not None:
                spans.append((start - 0.5, i - 0.5))
                start = None
        for k, (key, title, log, thr_key) in enumerate(panels):
            ax = axes[k][j]
            y = _values(steps, key)
            for a, b in spans:
                ax.axvspan(a, b, color="0.9", lw=0)
            ax.plot(x, y, lw=0.8, color="C0")
            ax.scatter([x[i] for i in harmful], [y[i] for i in harmful], marker="x", s=14, color="red", lw=0.8,
                       label="harmful reuse step (dJ < 0)", zorder=3)
            if thr_key is not None and thr_key in thresholds and any(v == v for v in y):
                thr = thresholds[thr_key]
                trips = trip_steps([{**s, key: v if v == v else -math.inf} for s, v in zip(steps, y)], key, thr)
                ax.axhline(thr, color="0.3", lw=0.8, ls="--", label=f"threshold {thr:g}")
                ax.scatter([x[i] for i in trips], [y[i] for i in trips], marker="v", s=30, color="black",
                           label=f"trip of {key} > {thr:g} ({len(trips)})", zorder=4)
            if log and any(v > 0 for v in y):
                ax.set_yscale("log")
            ax.set_ylabel(title, fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if k == 0:
                ax.set_title(f"{r.task}, lr {r.lr:g}, {r.arm}, seed {r.seed}: {len(harmful)} harmful reuse steps "
                             f"of {sum(int(s['reuse_index']) > 1 for s in steps)} (grey: reuse passes)", fontsize=9)
            if k == 0 or thr_key is not None:
                ax.legend(fontsize=6, loc="upper left")
        axes[-1][j].set_xlabel("optimizer step")
    return _save(fig, out, "signals.png")


def write_plots(out: str, results: Sequence, arm_order: Sequence[str], thresholds: Mapping[str, float]) -> list[str]:
    """Every plot above that the runs have data for; returns the paths written."""
    os.makedirs(out, exist_ok=True)
    paths = [plot_curves(out, results, arm_order), plot_weight_change(out, results, arm_order)]
    sig = plot_signals(out, results, thresholds)
    return paths + ([sig] if sig else [])
