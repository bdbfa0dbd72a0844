"""Summaries, the results table, JSON/CSV files and PNG plots of a demo run.

Definitions (also printed under the table):

* ``reward``: mean reward of the rollout batch (sampled at temperature 1 from the current policy on fresh
  prompts), i.e. an unbiased estimate of the policy's sampled accuracy at that point.
* ``final``: mean ``reward`` over the last ``max(5, iters // 10)`` rollout batches; ``greedy``: greedy accuracy on
  the fixed held-out set at the end.
* ``target``: the single-use arm's (``k1``) ``final`` on the same task and seed. ``rollouts to target`` is the
  number of rollouts consumed when the trailing ``smooth``-batch moving average of ``reward`` first reaches it
  (``wall to target`` likewise in seconds); ``reached`` counts the seeds that reach it (of those with a ``k1`` run);
  the others are left out of the mean.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from typing import Any, Sequence

__all__ = ["summarize", "aggregate", "format_table", "paired", "format_paired", "write_results", "plot_all",
           "DEFINITIONS"]

DEFINITIONS = __doc__.split("Definitions (also printed under the table):", 1)[1].strip()


def _moving(xs: Sequence[float], w: int) -> list[float]:
    out = []
    for i in range(len(xs)):
        seg = xs[max(0, i - w + 1) : i + 1]
        out.append(sum(seg) / len(seg))
    return out


def _train_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    return [h for h in res["history"] if h["iter"] > 0]


def summarize(results: list[dict[str, Any]], smooth: int, base_arm: str = "k1") -> list[dict[str, Any]]:
    """One summary row per (task, arm, seed), with rollouts/wall to the ``base_arm``'s final reward."""
    rows = []
    finals: dict[tuple[str, int], float] = {}
    for res in results:
        tr = _train_rows(res)
        n = max(5, len(tr) // 10)
        final = statistics.fmean(h["reward"] for h in tr[-n:]) if tr else float("nan")
        res["_final"] = final
        if res["arm"] == base_arm:
            finals[(res["task"], res["seed"])] = final
    for res in results:
        tr = _train_rows(res)
        ma = _moving([h["reward"] for h in tr], smooth)
        target = finals.get((res["task"], res["seed"]))
        r_t = w_t = None
        if target is not None:
            for h, m in zip(tr, ma):
                if m >= target - 1e-12:
                    r_t, w_t = h["rollouts"], h["wall"]
                    break
        last = res["history"][-1]
        wc = last.get("wc", {})
        c = res["counts"]
        e = res["reuse"]["energy"]
        uu = res["reuse"]["update_unused"]
        kmax = max((int(k) for k in e), default=1)
        rows.append({
            "task": res["task"],
            "arm": res["arm"],
            "seed": res["seed"],
            "final_reward": res["_final"],
            "final_greedy": last.get("greedy", float("nan")),
            "target": target if target is not None else float("nan"),
            "rollouts_to_target": r_t,
            "wall_to_target": w_t,
            "rollouts": c["rollouts"],
            "wall": last["wall"],
            "steps_applied": c["steps_applied"],
            "passes_per_batch": c["passes"] / max(1, c["rollout_batches"]),
            "trips": c["trips"],
            "wc_lm_head": wc.get("lm_head", float("nan")),
            "wc_lm_head_used": wc.get("lm_head/used", float("nan")),
            "wc_lm_head_unused": wc.get("lm_head/unused", float("nan")),
            "wc_attention": wc.get("attention", float("nan")),
            "wc_mlp": wc.get("mlp", float("nan")),
            "wc_embeddings": wc.get("embeddings", float("nan")),
            "energy_ratio_kmax": (e[str(kmax)] / e["1"]) if kmax > 1 and e.get("1") else float("nan"),
            "update_unused_ratio_kmax": (uu[str(kmax)] / uu["1"]) if kmax > 1 and uu.get("1") else float("nan"),
        })
    return rows


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(rows: list[dict[str, Any]], arm_order: Sequence[str]) -> list[dict[str, Any]]:
    """Mean (and seed standard deviation) per (task, arm) of the summary rows."""
    out = []
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        base = {r["seed"]: r for r in rows if r["task"] == task and r["arm"] == "k1"}
        for arm in arm_order:
            rs = [r for r in rows if r["task"] == task and r["arm"] == arm]
            if not rs:
                continue
            fr, fr_sd = _mean_sd([r["final_reward"] for r in rs])
            gr, _ = _mean_sd([r["final_greedy"] for r in rs])
            with_target = [r for r in rs if not math.isnan(r["target"])]
            reached = [r for r in with_target if r["rollouts_to_target"] is not None]
            rt, rt_sd = _mean_sd([r["rollouts_to_target"] for r in reached])
            wt, _ = _mean_sd([r["wall_to_target"] for r in reached])
            # per-seed speed-up vs k1 (only seeds where both reached the target)
            sp = [base[r["seed"]]["rollouts_to_target"] / r["rollouts_to_target"] for r in reached
                  if r["seed"] in base and base[r["seed"]]["rollouts_to_target"]]
            spw = [base[r["seed"]]["wall_to_target"] / r["wall_to_target"] for r in reached
                   if r["seed"] in base and base[r["seed"]]["wall_to_target"] and r["wall_to_target"]]
            out.append({
                "task": task,
                "arm": arm,
                "seeds": len(rs),
                "final_reward": fr,
                "final_reward_sd": fr_sd,
                "final_greedy": gr,
                "reached": len(reached),
                "with_target": len(with_target),
                "rollouts_to_target": rt,
                "rollouts_to_target_sd": rt_sd,
                "speedup_rollouts": statistics.fmean(sp) if sp else float("nan"),
                "wall_to_target": wt,
                "speedup_wall": statistics.fmean(spw) if spw else float("nan"),
                "wall": _mean_sd([r["wall"] for r in rs])[0],
                "passes_per_batch": _mean_sd([r["passes_per_batch"] for r in rs])[0],
                "trips": _mean_sd([r["trips"] for r in rs])[0],
                "wc_lm_head_unused": _mean_sd([r["wc_lm_head_unused"] for r in rs])[0],
                "wc_lm_head_used": _mean_sd([r["wc_lm_head_used"] for r in rs])[0],
                "wc_attention": _mean_sd([r["wc_attention"] for r in rs])[0],
                "wc_mlp": _mean_sd([r["wc_mlp"] for r in rs])[0],
                "energy_ratio_kmax": _mean_sd([r["energy_ratio_kmax"] for r in rs])[0],
            })
    return out


def _f(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def format_table(agg: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`aggregate`'s rows."""
    head = ("| task | arm | seeds | final reward (± sd) | greedy | reached | rollouts to target (± sd) | "
            "x vs K=1 | wall to target s | x wall | passes/batch | trips | dW lm_head used / unused | "
            "dW attn / mlp | E_K/E_1 |")
    sep = "|" + "---|" * head.count("|")[:-1] if False else "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"
    lines = [head, sep]
    for a in agg:
        lines.append(
            f"| {a['task']} | {a['arm']} | {a['seeds']} | {_f(a['final_reward'])} ± {_f(a['final_reward_sd'])} | "
            f"{_f(a['final_greedy'], '.2f')} | {a['reached']}/{a['with_target']} | "
            f"{_f(a['rollouts_to_target'], '.0f')} ± {_f(a['rollouts_to_target_sd'], '.0f')} | "
            f"{_f(a['speedup_rollouts'], '.2f')} | {_f(a['wall_to_target'], '.1f')} | {_f(a['speedup_wall'], '.2f')} | "
            f"{_f(a['passes_per_batch'], '.2f')} | {_f(a['trips'], '.1f')} | "
            f"{_f(a['wc_lm_head_used'])} / {_f(a['wc_lm_head_unused'])} | "
            f"{_f(a['wc_attention'])} / {_f(a['wc_mlp'])} | {_f(a['energy_ratio_kmax'], '.2f')} |"
        )
    return "\n".join(lines)


def paired(rows: list[dict[str, Any]], arm_order: Sequence[str], bases: Sequence[str] = ("k1", "naive", "kl")
           ) -> list[dict[str, Any]]:
    """Per-seed comparisons of each arm with each base arm on the same task and seed.

    For every (task, arm, base): the mean per-seed difference in final reward and in rollouts to target, and in
    how many seeds the arm's final reward is >= the base's, and its rollouts to target <= the base's (a seed that
    did not reach the target counts as worse than one that did).
    """
    by = {(r["task"], r["arm"], r["seed"]): r for r in rows}
    out = []
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        for arm in arm_order:
            for base in bases:
                if arm == base or (arm in bases and bases.index(arm) < bases.index(base)):
                    continue  # the mirrored row is shown
                seeds = [s for (t, a, s) in by if t == task and a == arm and (task, base, s) in by]
                if not seeds:
                    continue
                dfin, drt, win_f, win_r = [], [], 0, 0
                inf = float("inf")
                for s in sorted(seeds):
                    a, b = by[(task, arm, s)], by[(task, base, s)]
                    dfin.append(a["final_reward"] - b["final_reward"])
                    win_f += a["final_reward"] >= b["final_reward"]
                    ra = a["rollouts_to_target"] if a["rollouts_to_target"] is not None else inf
                    rb = b["rollouts_to_target"] if b["rollouts_to_target"] is not None else inf
                    win_r += ra <= rb
                    if ra < inf and rb < inf:
                        drt.append(ra - rb)
                out.append({"task": task, "arm": arm, "vs": base, "seeds": len(seeds),
                            "d_final": statistics.fmean(dfin), "final_ge": win_f,
                            "d_rollouts": statistics.fmean(drt) if drt else float("nan"), "rollouts_le": win_r})
    return out


def format_paired(pr: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`paired`."""
    lines = ["| task | arm | vs | seeds | mean d final reward | final >= (seeds) | mean d rollouts to target | "
             "rollouts <= (seeds) |", "|---|---|---|---|---|---|---|---|"]
    for p in pr:
        lines.append(f"| {p['task']} | {p['arm']} | {p['vs']} | {p['seeds']} | {p['d_final']:+.3f} | "
                     f"{p['final_ge']}/{p['seeds']} | {_f(p['d_rollouts'], '+.0f')} | {p['rollouts_le']}/{p['seeds']} |")
    return "\n".join(lines)


def write_results(out: str, meta: dict[str, Any], results: list[dict[str, Any]], rows: list[dict[str, Any]],
                  agg: list[dict[str, Any]], table: str, paired_table: str = "") -> list[str]:
    """Write results.json, summary.csv, table.csv, history.csv and table.md under ``out``; return the paths."""
    os.makedirs(out, exist_ok=True)
    paths = []
    p = os.path.join(out, "results.json")
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    with open(p, "w") as f:
        json.dump({"meta": meta, "runs": clean, "summary": rows, "table": agg}, f, indent=1)
    paths.append(p)
    for name, data in (("summary.csv", rows), ("table.csv", agg)):
        p = os.path.join(out, name)
        with open(p, "w", newline="") as f:
            if data:
                w = csv.DictWriter(f, fieldnames=list(data[0]))
                w.writeheader()
                w.writerows(data)
        paths.append(p)
    p = os.path.join(out, "history.csv")
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        groups = sorted({k for r in results for h in r["history"] for k in h.get("wc", {})})
        w.writerow(["task", "arm", "seed", "iter", "rollouts", "wall", "reward", "greedy", "steps", "passes"]
                   + [f"wc:{g}" for g in groups])
        for r in results:
            for h in r["history"]:
                wc = h.get("wc", {})
                w.writerow([r["task"], r["arm"], r["seed"], h["iter"], h["rollouts"], f"{h['wall']:.4f}",
                            h["reward"], h.get("greedy", ""), h["steps"], h["passes"]]
                           + [wc.get(g, "") for g in groups])
    paths.append(p)
    p = os.path.join(out, "table.md")
    with open(p, "w") as f:
        f.write(table + "\n\n" + DEFINITIONS + "\n")
        if paired_table:
            f.write("\nPer-seed comparisons (same task, same seed):\n\n" + paired_table + "\n")
    paths.append(p)
    return paths


def _curves(results, task, arm, smooth, xkey):
    runs = [r for r in results if r["task"] == task and r["arm"] == arm]
    if not runs:
        return None
    n = min(len(_train_rows(r)) for r in runs)
    ys = [_moving([h["reward"] for h in _train_rows(r)][:n], smooth) for r in runs]
    xs = [[h[xkey] for h in _train_rows(r)][:n] for r in runs]
    x = [statistics.fmean(v) for v in zip(*xs)]
    mean = [statistics.fmean(v) for v in zip(*ys)]
    lo = [min(v) for v in zip(*ys)]
    hi = [max(v) for v in zip(*ys)]
    return x, mean, lo, hi


def plot_all(out: str, results: list[dict[str, Any]], arm_order: Sequence[str], smooth: int,
             dwd_arms: Sequence[str] = ("naive", "dgg")) -> list[str]:
    """reward_vs_rollouts.png, reward_vs_wall.png, dwd.png and reuse_energy.png under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    paths = []
    for xkey, fname, xlabel in (("rollouts", "reward_vs_rollouts.png", "rollouts consumed"),
                                ("wall", "reward_vs_wall.png", "wall-clock seconds (rollouts + updates)")):
        fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for arm in arm_order:
                c = _curves(results, task, arm, smooth, xkey)
                if c is None:
                    continue
                x, m, lo, hi = c
                (line,) = ax.plot(x, m, label=arm)
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
            ax.set_title(f"{task}: sampled reward ({smooth}-batch moving avg; band = seed min/max)", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("reward")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out, fname)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    # DWD panel: per-module relative weight change over rollouts, for the arms in dwd_arms (and k1 for scale).
    show = [a for a in ("k1",) + tuple(dwd_arms) if any(r["arm"] == a for r in results)]
    groups = ("lm_head/used", "lm_head/unused", "attention", "mlp", "embeddings")
    fig, axes = plt.subplots(len(tasks), max(1, len(show)), figsize=(4.6 * max(1, len(show)), 3.6 * len(tasks)),
                             squeeze=False)
    for i, task in enumerate(tasks):
        ymax = 0.0
        for j, arm in enumerate(show):
            ax = axes[i][j]
            runs = [r for r in results if r["task"] == task and r["arm"] == arm]
            for g in groups:
                pts = [[(h["rollouts"], h["wc"].get(g)) for h in r["history"] if "wc" in h] for r in runs]
                if not pts or pts[0][0][1] is None:
                    continue
                n = min(len(p) for p in pts)
                x = [pts[0][t][0] for t in range(n)]
                y = [statistics.fmean(p[t][1] for p in pts) for t in range(n)]
                ymax = max(ymax, max(y))
                ax.plot(x, y, label=g)
            ax.set_title(f"{task} / {arm}: ||W-W0||/||W0|| (seed mean)", fontsize=9)
            ax.set_xlabel("rollouts consumed")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for j in range(len(show)):
            axes[i][j].set_ylim(0, ymax * 1.05 if ymax > 0 else 1)
    fig.tight_layout()
    p = os.path.join(out, "dwd.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # lm_head gradient energy and unused-row update norm per reuse index, relative to k = 1.
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, (key, title) in enumerate((("energy", "E_k/E_1, lm_head grad energy"),
                                          ("update_unused", "U_k/U_1, unused-row lm_head update"))):
            ax = axes[i][j]
            arms = [a for a in arm_order if any(r["arm"] == a and len(r["reuse"][key]) > 1
                                                for r in results if r["task"] == task)]
            for a_i, arm in enumerate(arms):
                runs = [r for r in results if r["task"] == task and r["arm"] == arm]
                ks = sorted({int(k) for r in runs for k in r["reuse"][key]})
                vals = []
                for k in ks:
                    rs = [r["reuse"][key][str(k)] / r["reuse"][key]["1"] for r in runs
                          if str(k) in r["reuse"][key] and r["reuse"][key].get("1")]
                    vals.append(statistics.fmean(rs) if rs else float("nan"))
                width = 0.8 / max(1, len(arms))
                ax.bar([k + a_i * width - 0.4 + width / 2 for k in ks], vals, width=width, label=arm)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_title(f"{task}: {title} (run median, seed mean)", fontsize=8)
            ax.set_xlabel("reuse index k")
            ax.grid(alpha=0.3)
            if arms:
                ax.legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(out, "reuse_energy.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths
