"""``python -m dgg_fused.demo``: the RLVR reuse testbed (see docs/demo.md).

Runs GRPO arms (single use K=1, naive reuse K=4, fixed K=2, KL early stop, DGG) on identical seeds for one or more
verifiable tasks, prints the results table, and writes plots and JSON/CSV results under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace

__all__ = ["main", "build_parser"]


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


def build_parser() -> argparse.ArgumentParser:
    from .run import BASE_ARMS, DemoConfig

    d = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m dgg_fused.demo", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke-test run (seconds); still writes everything")
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--task", action="append", default=None,
                   help="task: 'addition', 'reversal' or module:attr (repeatable) [default: addition and reversal]")
    p.add_argument("--seeds", type=_seeds, default=None, help="seeds, e.g. '0,1,2' or '0-4' [default: 0]")
    p.add_argument("--arms", default=",".join(BASE_ARMS), help="comma-separated arms: k1, naive, k2, kl, dgg")
    p.add_argument("--arm", action="append", default=[],
                   help="extra arm with overrides, e.g. 'dgg:tau=1,window=16,statistic=increment' (repeatable)")
    p.add_argument("--K", type=int, default=d.K, help="max passes per rollout batch (naive, kl, dgg)")
    p.add_argument("--tau", type=float, default=d.tau, help="DGG Z-score threshold")
    p.add_argument("--window", type=int, default=d.window, help="DGG window length")
    p.add_argument("--statistic", default=d.statistic, help="DGG statistic: energy, increment, both")
    p.add_argument("--reference", default=d.reference, help="DGG window reference: first_pass, accepted, all")
    p.add_argument("--target-kl", type=float, default=d.target_kl, help="KL early-stop threshold")
    p.add_argument("--lr", type=float, default=d.lr, help="RL learning rate (AdamW)")
    p.add_argument("--iters", type=int, default=None, help=f"rollout batches per arm [default: {d.iters}]")
    p.add_argument("--prompts", type=int, default=None, help=f"prompts per batch [default: {d.prompts}]")
    p.add_argument("--group", type=int, default=None, help=f"samples per prompt G [default: {d.group}]")
    p.add_argument("--minibatches", type=int, default=None, help=f"optimizer steps per pass [default: {d.minibatches}]")
    p.add_argument("--vocab", type=int, default=None, help=f"vocabulary size [default: {d.model.vocab_size}]")
    p.add_argument("--warm-steps", type=int, default=None, help=f"warm-start steps [default: {d.warm.steps}]")
    p.add_argument("--label-noise", type=float, default=None, help=f"warm-start label noise [default: {d.warm.label_noise}]")
    p.add_argument("--warm-seed", type=int, default=None,
                   help="use this seed's warm start for every RL seed [default: each seed warm-starts with its own seed]")
    p.add_argument("--cache-dir", default=None, help="warm-start cache [default: $DGG_DEMO_CACHE or ~/.cache/dgg_fused/demo]")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the warm-start cache")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's choice]")
    p.add_argument("--from-runs", nargs="+", default=None, metavar="RUNS_JSONL",
                   help="train nothing: build the table, plots and files from runs.jsonl file(s) of earlier runs")
    return p


def config_from_args(args: argparse.Namespace):
    from .run import DemoConfig

    cfg = DemoConfig()
    if args.quick:
        cfg = replace(cfg, iters=6, prompts=4, group=4, minibatches=2, eval_every=3, n_eval=16, smooth=2,
                      warmup_iters=2, model=replace(cfg.model, vocab_size=512, hidden_size=32, intermediate_size=64),
                      warm=replace(cfg.warm, steps=20, batch=16))
    over = {k: v for k, v in (("iters", args.iters), ("prompts", args.prompts), ("group", args.group),
                              ("minibatches", args.minibatches)) if v is not None}
    cfg = replace(cfg, K=args.K, tau=args.tau, window=args.window, statistic=args.statistic,
                  reference=args.reference, target_kl=args.target_kl, lr=args.lr, **over)
    if args.vocab is not None:
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=args.vocab))
    if args.warm_steps is not None:
        cfg = replace(cfg, warm=replace(cfg.warm, steps=args.warm_steps))
    if args.label_noise is not None:
        cfg = replace(cfg, warm=replace(cfg.warm, label_noise=args.label_noise))
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import json

    import torch

    from . import report
    from .run import parse_arm, prepare_task, run_arm
    from .tasks import load_task
    from .warmstart import default_cache_dir, warm_start

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    seeds = args.seeds or [0]
    task_specs = args.task or ["addition", "reversal"]
    arm_specs = [a.strip() for a in args.arms.split(",") if a.strip()] + list(args.arm)
    arms = [parse_arm(a, cfg) for a in arm_specs]
    if len({a.name for a in arms}) != len(arms):
        raise SystemExit("duplicate arm names")
    tasks = [load_task(t) for t in task_specs]
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a demo dependency
        tqdm = None
    total = len(tasks) * len(seeds) * len(arms) * cfg.iters
    bar = tqdm(total=total, disable=args.no_progress or tqdm is None, unit="batch", dynamic_ncols=True,
               file=sys.stderr) if tqdm else None
    say = bar.write if bar is not None else print

    t_start = time.time()
    results = []
    if args.from_runs:
        for path in args.from_runs:
            with open(path) as f:
                results.extend(json.loads(line) for line in f if line.strip())
        seen = list(dict.fromkeys(r["arm"] for r in results))
        arms = [a for a in arms if a.name in seen]
        tasks = []
    os.makedirs(args.out, exist_ok=True)
    runs_path = os.path.join(args.out, "runs.jsonl")
    if not args.from_runs and os.path.exists(runs_path):
        os.remove(runs_path)
    for task in tasks:
        pt = prepare_task(task, cfg)
        for seed in seeds:
            if bar is not None:
                bar.set_description(f"{task.name} seed {seed} warm start")
            t0 = time.time()
            wseed = seed if args.warm_seed is None else args.warm_seed
            state, cached = warm_start(task, pt.tokenizer, cfg.model, cfg.warm, wseed, cache)
            say(f"[{task.name} seed {seed}] warm start (seed {wseed}) {'loaded from cache' if cached else f'trained in {time.time() - t0:.1f}s'}")
            for arm in arms:
                if bar is not None:
                    bar.set_description(f"{task.name} seed {seed} {arm.name}")
                res = run_arm(pt, arm, cfg, seed, state, on_iter=(bar.update if bar is not None else None))
                results.append(res)
                with open(runs_path, "a") as f:  # one line per finished run: an interrupted run keeps its results
                    f.write(json.dumps(res) + "\n")
    if bar is not None:
        bar.close()

    order = [a.name for a in arms] + [a for a in dict.fromkeys(r["arm"] for r in results)
                                      if a not in {b.name for b in arms}]
    rows = report.summarize(results, cfg.smooth)
    agg = report.aggregate(rows, order)
    table = report.format_table(agg)
    meta = {
        "command": "python -m dgg_fused.demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": cfg.to_dict(),
        "arms": {a.name: a.describe() for a in arms},
        "tasks": list(dict.fromkeys(r["task"] for r in results)),
        "seeds": seeds,
        "warm_seed": args.warm_seed,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "elapsed_s": time.time() - t_start,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    ptable = report.format_paired(report.paired(rows, order)) if len(seeds) > 1 or args.from_runs else ""
    paths = report.write_results(args.out, meta, results, rows, agg, table, ptable)
    if not args.no_plots:
        paths += report.plot_all(args.out, results, order, cfg.smooth)
    print()
    print(table)
    print()
    print(report.DEFINITIONS)
    print()
    if ptable:
        print("Per-seed comparisons (same task, same seed):\n")
        print(ptable)
        print()
    for a in arms:
        print(f"  {a.name}: {a.describe()}")
    if args.quick:
        print("\n--quick is a plumbing check: its tiny policy barely learns the task, so these numbers mean nothing.")
    print(f"\n{len(results)} runs in {meta['elapsed_s']:.0f}s; wrote " + ", ".join(os.path.basename(p) for p in paths)
          + f" to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
