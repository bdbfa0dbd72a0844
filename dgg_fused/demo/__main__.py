"""``python -m dgg_fused.demo``: the RLVR reuse testbed (see docs/demo.md).

Runs GRPO arms on identical seeds for one or more verifiable tasks and learning rates, prints the results table
(exact expected reward, rollouts-to-target, paired bootstrap CIs), the pre-registered targets and the harm-oracle
signal table, and writes everything under ``--out``. Independent runs execute in parallel worker processes
(``--jobs``) with pinned CPU code paths (:mod:`dgg_fused.demo.numerics`): every number is independent of the thread
count, of ``--jobs`` and of the x86-64 CPU.
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

__all__ = ["main", "build_parser", "config_from_args"]


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
    from .arms import BASE_ARMS
    from .run import DemoConfig

    d = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m dgg_fused.demo", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke-test run (seconds); still writes everything")
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--task", action="append", default=None,
                   help="task: 'addition', 'reversal', 'product' or module:attr (repeatable) "
                        "[default: addition and reversal]")
    p.add_argument("--seeds", type=_seeds, default=[0], help="seeds, e.g. '0,1,2' or '0-7'")
    p.add_argument("--lr", type=_floats, default=[d.lr], help="RL learning rate(s), comma-separated")
    p.add_argument("--arms", default=",".join(BASE_ARMS), help="comma-separated arms (see dgg_fused.demo.arms)")
    p.add_argument("--arm", action="append", default=[],
                   help="extra arm with overrides, e.g. 'dgg:tau=1,window=16' or "
                        "'gate:energy=false,drift=clip_frac,drift_threshold=0.1' (repeatable)")
    p.add_argument("--K", type=int, default=None, help=f"max passes per rollout batch [default: GateConfig's {d.K}]")
    p.add_argument("--tau", type=float, default=None, help=f"DGG Z-score threshold [default: GateConfig's {d.gate.tau}]")
    p.add_argument("--window", type=int, default=None, help=f"DGG window [default: GateConfig's {d.gate.window}]")
    p.add_argument("--target-kl", type=float, default=d.target_kl, help="KL early-stop threshold (kl, klgate)")
    p.add_argument("--iters", type=int, default=None, help=f"rollout batches per run [default: {d.iters}]")
    p.add_argument("--heldout", type=int, default=None, help=f"held-out prompts [default: {d.n_heldout}]")
    p.add_argument("--warm-steps", type=int, default=None, help=f"warm-start steps [default: {d.warm.steps}]")
    p.add_argument("--warm-seed", type=int, default=None,
                   help="use this seed's warm start for every RL seed [default: each seed its own]")
    p.add_argument("--observe", default="naive",
                   help="comma-separated arms that record the harm oracle (per-step exact dJ and signals)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="parallel worker processes (each runs with one intra-op thread and pinned CPU code paths; "
                        "see dgg_fused.demo.numerics)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in OUT/runs.jsonl (same config) and run only the missing ones")
    p.add_argument("--cache-dir", default=None, help="warm-start cache [default: $DGG_DEMO_CACHE or ~/.cache/dgg_fused/demo]")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the warm-start cache")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress lines")
    p.add_argument("--from-runs", nargs="+", default=None, metavar="RUNS_JSONL",
                   help="train nothing: build the tables and files from runs.jsonl file(s)")
    return p


def config_from_args(args: argparse.Namespace):
    """The :class:`~dgg_fused.demo.run.DemoConfig` of a command line (one per lr: ``replace(cfg, lr=...)``)."""
    from .run import DemoConfig

    cfg = DemoConfig()
    if args.quick:
        cfg = replace(cfg, iters=6, prompts=4, group=4, minibatches=2, eval_every=3, n_heldout=16,
                      warmup_iters=2, model=replace(cfg.model, vocab_size=512, hidden_size=32, intermediate_size=64),
                      warm=replace(cfg.warm, steps=300, batch=32))
    gate_over = {k: v for k, v in (("max_reuse", args.K), ("tau", args.tau), ("window", args.window)) if v is not None}
    over = {k: v for k, v in (("iters", args.iters), ("n_heldout", args.heldout)) if v is not None}
    cfg = replace(cfg, gate=replace(cfg.gate, **gate_over), target_kl=args.target_kl, **over)
    if args.warm_steps is not None:
        cfg = replace(cfg, warm=replace(cfg.warm, steps=args.warm_steps))
    return cfg


def _fingerprint(cfg) -> str:
    """What a run in runs.jsonl must share with this command to be kept by ``--resume``: the configuration (but
    the lr, which is part of each run's key) and the numerics mode."""
    from .numerics import MODE

    return json.dumps({"config": replace(cfg, lr=0.0).to_dict(), "numerics": MODE}, sort_keys=True, default=str)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from . import numerics, report
    from .arms import parse_arm
    from .jobs import Unit, WarmFn, execute, run_unit
    from .run import RunResult
    from .warmstart import default_cache_dir

    t_start = time.time()
    say = (lambda *a: None) if args.no_progress else (lambda s: print(s, file=sys.stderr, flush=True))
    cfg = config_from_args(args)
    arm_specs = [a.strip() for a in args.arms.split(",") if a.strip()] + list(args.arm)
    arms = [parse_arm(a, cfg.gate, cfg.target_kl) for a in arm_specs]
    if len({a.name for a in arms}) != len(arms):
        raise SystemExit("duplicate arm names")
    observe = {a.strip() for a in args.observe.split(",") if a.strip()}
    os.makedirs(args.out, exist_ok=True)
    runs_path = os.path.join(args.out, "runs.jsonl")
    results: list[RunResult] = []

    if args.from_runs:
        for path in args.from_runs:
            with open(path) as f:
                results.extend(RunResult.from_dict({k: v for k, v in json.loads(line).items() if k != "_meta"})
                               for line in f if line.strip())
        seen = list(dict.fromkeys(r.arm for r in results))
        arm_order = [a.name for a in arms if a.name in seen] + [a for a in seen if a not in {b.name for b in arms}]
    else:
        task_specs = args.task or ["addition", "reversal"]
        if args.no_cache:
            cache = os.path.join(args.out, ".warm")  # private to this run; removed below
        else:
            cache = args.cache_dir or default_cache_dir()
        units = [Unit(t, replace(cfg, lr=lr), arm, seed, seed if args.warm_seed is None else args.warm_seed, cache,
                       arm.name in observe)
                 for t in task_specs for lr in args.lr for seed in args.seeds for arm in arms]
        fp = _fingerprint(cfg)
        done: dict[str, dict] = {}
        if args.resume and os.path.exists(runs_path):
            with open(runs_path) as f:
                for line in f:
                    if line.strip():
                        d = json.loads(line)
                        if d.get("_meta", {}).get("fingerprint") == fp:
                            done[d["_meta"]["key"]] = d
        else:
            open(runs_path, "w").close()
        # seed-major order: an interrupted grid has whole seeds of every (task, lr, arm) cell
        todo = sorted((u for u in units if u.key() not in done), key=lambda u: (u.seed, -u.arm.max_reuse))
        say(f"{len(units)} runs ({len(done)} already in {runs_path}); {args.jobs} job(s)")
        warm = sorted({(u.task, u.warm_seed) for u in todo})
        for (t, s), (_, _, cached, dt) in execute(WarmFn(cfg, cache), warm, args.jobs):
            say(f"[{t} seed {s}] warm start {'loaded from cache' if cached else f'trained in {dt:.1f}s'}")
        by_key = dict(done)
        with open(runs_path, "a") as f:
            for u, d in execute(run_unit, todo, args.jobs):
                d["_meta"] = {"key": u.key(), "fingerprint": fp, "numerics": d.pop("_numerics")}
                el = d.pop("_elapsed")
                f.write(json.dumps(d) + "\n")  # one line per finished run: an interrupted grid keeps its results
                f.flush()
                by_key[u.key()] = d
                say(f"[{u.task} lr {u.cfg.lr:g} seed {u.seed} {u.arm.name}] final J "
                    f"{d['history'][-1]['expected']:.3f} ({el:.1f}s)")
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
    sig = report.signals(results, {"z_energy": cfg.gate.tau, "approx_kl": cfg.target_kl})
    text = "\n\n".join(x for x in (
        report.format_table(agg), report.DEFINITIONS,
        "Pre-registered targets (per gate arm):\n\n" + report.format_targets(tgts) + "\n\n"
        + report.format_target_summary(report.target_summary(tgts, rows)) if tgts else "",
        "Harm oracle (arms: " + ", ".join(sorted({r.arm for r in results if r.steps})) + "):\n\n"
        + report.format_signals(sig) if sig else "",
        "Share of the greedy oracle's gain (the oracle is a ceiling, not a method):\n\n"
        + report.format_oracle_fractions(fractions) if fractions else "") if x)
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
    paths = report.write_results(args.out, meta, rows, agg, sig, tgts, text, fractions)
    if not args.no_plots:
        paths.append(report.plot_curves(args.out, results, arm_order))
    print(text)
    print()
    for a in arms:
        print(f"  {a.name}: {a.describe()}")
    if args.quick:
        print("\n--quick is a plumbing check: its tiny policy barely learns the task, so these numbers mean nothing.")
    print(f"\n{len(results)} runs in {meta['elapsed_s']:.0f}s; wrote "
          + ", ".join(os.path.basename(p) for p in paths) + f" to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
