"""Turn pytest-benchmark JSON from benchmarks/ into the markdown tables of the README and docs/benchmarks.md.

    python -m pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json            # prints markdown; --out FILE writes it
    python benchmarks/report.py energy.json step.json # several runs (e.g. one per suite) as one report

``--save-compact FILE`` also writes the fields the report needs (small, for docs/). Without an argument it reads the newest JSON under ``.benchmarks/`` (pytest-benchmark's ``--benchmark-autosave``).
The same table is printed at the end of every ``pytest benchmarks/ --benchmark-only`` run (benchmarks/conftest.py).
All ratios are taken between rows of the same run; times are medians (CUDA-event medians on GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

BASELINE_ORDER = ["vector_norm", "_foreach_norm", "get_total_norm", "naive"]
BASELINE_LABEL = {
    "vector_norm": "vector_norm(fp32)",
    "_foreach_norm": "_foreach_norm",
    "get_total_norm": "get_total_norm",
    "naive": "naive .float().pow(2).sum()",
}
STEP_LABEL = {
    "read": "lm_head read alone (`_C_sumsq`) + bare",
    "floor": "sync-free floor: read + compare + found_inf step",
    "naive": "naive gate (`vector_norm` + `.item()`)",
}
OVERHEAD_SLACK = 1.25  # GPU target: overhead within 1.25x of the ideal bytes ratio
FLOOR_FACTOR, FLOOR_POINTS = 1.5, 0.01  # CPU target: gated <= max(1.5 x floor, floor + 1 point)
CPU_ROOFLINE_TARGET = 0.90
GPU_NOMINAL_TARGET = 0.85
MAX_ADDED_LAUNCHES = 2


def seconds(b: dict[str, Any]) -> float:
    """Median seconds of one benchmark: the CUDA-event median when recorded, else pytest-benchmark's median."""
    ev = b.get("extra_info", {}).get("event_median_s")
    return float(ev) if ev else float(b["stats"]["median"])


def _pct(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def _load(e: dict[str, Any]) -> str:
    la = e.get("loadavg")
    return f"{la[0]:.1f}" if la else "?"


def _gbps(nbytes: float, s: float) -> float:
    return nbytes / s / 1e9


def machine_line(data: dict[str, Any]) -> str:
    mi = data.get("machine_info", {})
    d = mi.get("dgg_fused", {})
    cpu = d.get("cpu_model") or mi.get("cpu", {}).get("brand_raw") or mi.get("processor", "?")
    parts = [
        f"device **{d.get('device_name') or d.get('device', 'cpu')}**" if d.get("device_name") else "device **cpu**",
        f"CPU {cpu}, {d.get('cpu_count', mi.get('cpu', {}).get('count', '?'))} cores, "
        f"{d.get('torch_threads', '?')} torch threads",
        f"torch {d.get('torch', '?')}",
        f"triton {d.get('triton') or 'n/a'}",
        f"Python {d.get('python') or mi.get('python_version', '?')}",
        f"dgg_fused backends {d.get('backends', '?')}",
    ]
    ls, le = d.get("loadavg_start"), d.get("loadavg_end")
    if ls or le:
        parts.append(f"load average (1/5/15 min) at start {ls}, at end {le}")
    when = data.get("datetime")
    if when:
        parts.append(f"run {when}")
    return "Machine: " + "; ".join(parts) + "."


def energy_table(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    groups: "OrderedDict[tuple[str, str], dict[str, dict]]" = OrderedDict()
    for b in rows:
        e = b["extra_info"]
        groups.setdefault((e["model"], e["dtype"]), {})[e["method"]] = b
    if not groups:
        return "", []
    ours = sorted({m for g in groups.values() for m in g if m.startswith(("ours[", "kernel["))})
    methods = ours + [m for m in BASELINE_ORDER if any(m in g for g in groups.values())]
    any_nominal = any(g[m]["extra_info"].get("nominal_bandwidth") for g in groups.values() for m in g)
    head = ["lm_head (benchmarked shape)", "dtype", "read roofline GB/s"]
    if any_nominal:
        head.append("nominal GB/s")
    head += [BASELINE_LABEL.get(m, m) for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    facts = []
    for (model, dtype), g in groups.items():
        anyb = next(iter(g.values()))["extra_info"]
        shape = "x".join(map(str, anyb["shape"]))
        roof = g.get("roofline")
        roof_bw = _gbps(roof["extra_info"]["bytes"], seconds(roof)) if roof else None
        nominal = anyb.get("nominal_bandwidth")
        cells = [f"{model} ({shape}; {anyb['scaling']})", dtype, f"{roof_bw:.1f}" if roof_bw else "—"]
        if any_nominal:
            cells.append(f"{nominal / 1e9:.0f}" if nominal else "—")
        for m in methods:
            b = g.get(m)
            if b is None:
                cells.append("skipped")
                continue
            bw = _gbps(b["extra_info"]["bytes"], seconds(b))
            frac = b["extra_info"].get("paired_roofline_frac") or (bw / roof_bw if roof_bw else None)
            txt = f"{bw:.2f} ({_pct(frac)})"
            if nominal:
                txt += f" [{_pct(bw * 1e9 / nominal)} nom.]"
            rd = b["extra_info"].get("result_dtype")
            if m in ("_foreach_norm", "get_total_norm") and rd and rd != "float32":
                txt += f" →{rd}"
            cells.append(txt)
            facts.append({"model": model, "dtype": dtype, "method": m, "gbps": bw, "roofline_frac": frac,
                          "nominal_frac": bw * 1e9 / nominal if nominal else None, "device": anyb.get("device")})
        lines.append("| " + " | ".join(cells) + " |")
    note = ("GB/s = bytes of the gradient read once / median time. (%) = fraction of the read roofline (`sum()` of "
            "the same bytes viewed as fp32, same run), from paired timings: the method and the roofline alternate, "
            "median of the per-pair ratios"
            + ("; [nom.] = fraction of the card's nominal bandwidth" if any_nominal else "")
            + ". `→bfloat16` etc.: the result comes back in the input dtype."
            + _load_range(rows))
    return "\n".join(lines) + "\n\n" + note, facts


def _load_range(rows: list[dict[str, Any]]) -> str:
    loads = [b["extra_info"]["loadavg"][0] for b in rows if b["extra_info"].get("loadavg")]
    return f" 1-minute load average during these rows: {min(loads):.1f}-{max(loads):.1f}." if loads else ""


def step_table(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    groups: "OrderedDict[tuple[str, bool], dict[str, dict]]" = OrderedDict()
    for b in rows:
        e = b["extra_info"]
        groups.setdefault((e["param_set"], e["clip"]), {})[e["variant"]] = b
    if not groups:
        return "", []
    cuda = any("launches_per_step" in b["extra_info"] and isinstance(b["extra_info"]["launches_per_step"], dict)
               for g in groups.values() for b in g.values())
    head = ["param set", "step", "median ms", "added ms (paired)", "overhead: paired median [IQR]", "min/min",
            "ideal", "paired / ideal", "host syncs/step", "load"]
    if cuda:
        head += ["kernels/step (added)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    facts = []
    for (pset, clip), g in groups.items():
        bare = g.get("bare")
        t_bare = seconds(bare) if bare else None
        variants = (["bare"] if bare else []) + [v for v in ("read", "floor") if v in g] + \
            sorted(v for v in g if v.startswith("ours[")) + [v for v in g if v == "naive"]
        for v in variants:
            b = g[v]
            e = b["extra_info"]
            t = seconds(b)
            label = f"{pset}: {e['params'] / 1e6:.1f}M params, lm_head {100 * e['lm_head_fraction']:.1f}%"
            if clip:
                label += ", clip"
            if v == "bare":
                stepname = "bare AdamW(fused)" + (" + clip_grad_norm_" if clip else "")
                cells = [label, stepname, f"{t * 1e3:.2f}", "—", "—", "—", _pct(e["ideal_overhead"], 2), "—",
                         f"{e['host_syncs_per_step']:g}", _load(e)]
                if cuda:
                    cells.append("—")
                lines.append("| " + " | ".join(cells) + " |")
                continue
            paired = e.get("paired_overhead")
            mn = e.get("paired_min_ratio")
            q1, q3 = e.get("paired_ratio_q1"), e.get("paired_ratio_q3")
            ideal = e["ideal_overhead"]
            stepname = STEP_LABEL.get(v, f"GatedOptimizer ({v[5:-1]})")
            if clip and v.startswith("ours["):
                stepname += " max_grad_norm, fold_clip"
            added = e.get("paired_b_median_s", 0) - e.get("paired_a_median_s", 0)
            cells = [label, stepname, f"{t * 1e3:.2f}", f"{added * 1e3:+.2f}",
                     f"{_pct(paired, 2)} [{_pct(q1 - 1 if q1 else None, 1)}, {_pct(q3 - 1 if q3 else None, 1)}]",
                     _pct(mn - 1 if mn else None, 2),
                     _pct(ideal, 2), f"{paired / ideal:.1f}x" if paired is not None and ideal else "—",
                     f"{e['host_syncs_per_step']:g}", _load(e)]
            if cuda:
                lp = e.get("launches_per_step")
                cells.append(f"{lp['kernels']:g} (+{e['added_kernels_per_step']:g})" if isinstance(lp, dict) else "—")
            lines.append("| " + " | ".join(cells) + " |")
            facts.append({"param_set": pset, "clip": clip, "variant": v, "paired_overhead": paired,
                          "min_overhead": mn - 1 if mn else None, "ideal": ideal, "host_syncs": e["host_syncs_per_step"],
                          "added_kernels": e.get("added_kernels_per_step"), "gated_steps": e.get("gated_steps"),
                          "added_kernel_names": e.get("added_kernel_names"), "device": e.get("device", "cpu")})
    note = ("median ms: pytest-benchmark's median of the step alone. overhead = time / bare time - 1, from paired "
            "timings: the step and the bare step alternate (ABBA) in one loop on the same parameters; *paired median*: "
            "median of the per-pair ratios [first, third quartile]; *added ms*: difference of the two paired medians; *min/min*: ratio of the two fastest steps "
            "(contention only adds time, so on a loaded machine this estimates the uncontended ratio). ideal = lm_head gradient bytes / bytes the bare step moves (28 B/param for "
            "fused AdamW in fp32, +12 B/param for clipping). load: 1-minute load average when the row started. Host syncs counted with a TorchDispatchMode "
            "(`_local_scalar_dense`, `nonzero`, `equal`, blocking device-to-host copies). No gate tripped while "
            "timed (checked; a trip fails the run).")
    return "\n".join(lines) + "\n\n" + note, facts


def pipeline_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    by = {b["extra_info"]["variant"]: b for b in rows}
    bare = by.get("bare")
    lines = ["| step in a loop with queued work | ms per step | vs bare |", "|---|---|---|"]
    for v in ("bare", "ours[auto]", "naive"):
        if v not in by:
            continue
        b = by[v]
        per = seconds(b) / b["extra_info"]["steps_per_call"]
        rel = _pct(seconds(b) / seconds(bare) - 1, 2) if bare and v != "bare" else "—"
        lines.append(f"| {v} | {per * 1e3:.3f} | {rel} |")
    work = rows[0]["extra_info"].get("work", "")
    return "\n".join(lines) + f"\n\nEach step is preceded by queued work ({work}); the loop synchronises once."


def _energy_target_rows(energy: list[dict[str, Any]], methods: tuple[str, ...], dtypes: tuple[str, ...],
                        cpu: bool) -> list[dict[str, Any]]:
    return [f for f in energy if (f["device"] == "cpu") == cpu and f["method"] in methods and f["dtype"] in dtypes]


def targets(energy: list[dict[str, Any]], steps: list[dict[str, Any]]) -> str:
    out = ["| target | measured | status |", "|---|---|---|"]
    # 1. energy op bandwidth (judged on the kernel rows when present; the public op's rows shown beside)
    cpu = _energy_target_rows(energy, ("kernel[cpp]",), ("fp32", "bf16"), True) or \
        _energy_target_rows(energy, ("ours[cpp]",), ("fp32", "bf16"), True)
    if cpu:
        worst = min(f["roofline_frac"] for f in cpu)
        vals = ", ".join(f"{f['model']} {f['dtype']} {_pct(f['roofline_frac'])}" for f in cpu)
        op = _energy_target_rows(energy, ("ours[cpp]",), ("fp32", "bf16"), True)
        if op and cpu[0]["method"] != "ours[cpp]":
            vals += f" (through `grad_sumsq`: {_pct(min(f['roofline_frac'] for f in op))}-" \
                    f"{_pct(max(f['roofline_frac'] for f in op))})"
        out.append(f"| energy op >= 90% of the same-bytes read, fp32 & bf16, CPU ({cpu[0]['method']}) | {vals} | "
                   f"{'met' if worst >= CPU_ROOFLINE_TARGET else 'not met'} |")
    elif any(f["device"] == "cpu" for f in energy):
        out.append("| energy op >= 90% of the same-bytes read, fp32 & bf16, CPU | no `cpp` backend in this "
                   "run | not measured |")
    gpu = [f for f in energy if f["device"] != "cpu" and f["model"] == "Qwen2.5-7B"
           and f["method"] in ("kernel[triton]", "kernel[cuda]", "ours[triton]", "ours[cuda]")
           and f["nominal_frac"] is not None]
    if gpu:
        for meth in sorted({f["method"] for f in gpu}):
            rows = [f for f in gpu if f["method"] == meth]
            worst = min(f["nominal_frac"] for f in rows)
            vals = ", ".join(f"{f['dtype']} {_pct(f['nominal_frac'])}" for f in rows)
            out.append(f"| energy op >= 85% of nominal HBM bandwidth, 7B lm_head ({meth}) | {vals} | "
                       f"{'met' if worst >= GPU_NOMINAL_TARGET else 'not met'} |")
    elif any(f["device"] != "cpu" for f in energy):
        out.append("| energy op >= 85% of nominal HBM bandwidth, 7B lm_head | no triton/cuda rows | not measured |")
    # 2. step overhead: CPU vs the same-run sync-free floor; GPU vs the ideal bytes ratio
    ours = [s for s in steps if s["variant"].startswith("ours[")]
    floors = {(s["param_set"], s["clip"]): s for s in steps if s["variant"] == "floor"}
    for s in ours:
        if s["paired_overhead"] is None:
            continue
        fl = floors.get((s["param_set"], s["clip"]))
        where = f"{s['param_set']}{', clip' if s['clip'] else ''}, {s['variant']}"
        if s["device"] == "cpu" and fl is not None and fl["paired_overhead"] is not None:
            f = fl["paired_overhead"]
            limit = max(FLOOR_FACTOR * f, f + FLOOR_POINTS)
            out.append(f"| CPU gated step <= max(1.5 x floor, floor + 1 point) ({where}) | "
                       f"{_pct(s['paired_overhead'], 2)} vs floor {_pct(f, 2)} (limit {_pct(limit, 2)}) | "
                       f"{'met' if s['paired_overhead'] <= limit else 'not met'} |")
        else:
            ok = s["paired_overhead"] <= OVERHEAD_SLACK * s["ideal"]
            out.append(f"| gated step overhead <= 1.25 x ideal ({where}) | paired median "
                       f"{_pct(s['paired_overhead'], 2)} ({s['paired_overhead'] / s['ideal']:.1f}x ideal "
                       f"{_pct(s['ideal'], 2)}); min/min {_pct(s['min_overhead'], 2)} | {'met' if ok else 'not met'} |")
    # 3. host syncs, launches
    if ours:
        worst = max(s["host_syncs"] for s in ours)
        naive = [s["host_syncs"] for s in steps if s["variant"] == "naive"]
        out.append(f"| 0 host syncs per gated step | ours {worst:g}" + (f", naive {max(naive):g}" if naive else "")
                   + f" | {'met' if worst == 0 else 'not met'} |")
        added = [s for s in ours if s["added_kernels"] is not None]
        if added:
            worst = max(added, key=lambda s: s["added_kernels"])
            names = ", ".join(f"{k} x{v:g}" for k, v in (worst.get("added_kernel_names") or {}).items())
            out.append(f"| <= 2 launches per gated step, fused AdamW (CUDA) | +{worst['added_kernels']:g} kernels vs "
                       f"bare ({names}) | {'met' if worst['added_kernels'] <= MAX_ADDED_LAUNCHES else 'not met'} |")
        else:
            out.append("| <= 2 launches per gated step, fused AdamW (CUDA) | no CUDA in this run | not measured |")
    return "\n".join(out)


def render(data: dict[str, Any]) -> str:
    rows = data.get("benchmarks", [])
    clocks = sorted({b.get("extra_info", {}).get("paired_clock") for b in rows} - {None})
    by_suite: dict[str, list] = {}
    for b in rows:
        by_suite.setdefault(b.get("extra_info", {}).get("suite", "?"), []).append(b)
    parts = [machine_line(data)]
    if "process" in clocks:
        parts[0] += (" Paired ratios timed with the process CPU clock (`DGG_BENCH_CLOCK=process`: time slices taken by "
                     "other processes do not count)." if clocks == ["process"] else
                     f" Paired-ratio clocks in this report: {', '.join(clocks)}.")
    etab, efacts = energy_table(by_suite.get("energy", []))
    if etab:
        parts += ["### Energy op bandwidth", etab]
    stab, sfacts = step_table(by_suite.get("step", []))
    if stab:
        parts += ["### Gate overhead per optimizer step", stab]
    ptab = pipeline_table(by_suite.get("pipeline", []))
    if ptab:
        parts += ["### Step loop with queued work (GPU)", ptab]
    parts += ["### Targets", targets(efacts, sfacts)]
    return "\n\n".join(parts) + "\n"


def compact(data: dict[str, Any]) -> dict[str, Any]:
    """The parts of a pytest-benchmark JSON the report needs (small enough to commit under docs/)."""
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {})
    keep_stats = ("min", "max", "mean", "median", "iqr", "stddev", "rounds")
    return {
        "datetime": data.get("datetime"),
        "version": data.get("version"),
        "machine_info": {
            "python_version": mi.get("python_version"),
            "cpu": {k: cpu.get(k) for k in ("brand_raw", "count", "arch", "l3_cache_size") if k in cpu},
            "dgg_fused": mi.get("dgg_fused", {}),
        },
        "benchmarks": [
            {
                "group": b.get("group"),
                "name": b.get("name"),
                "stats": {k: b["stats"][k] for k in keep_stats if k in b["stats"]},
                "extra_info": b.get("extra_info", {}),
            }
            for b in data.get("benchmarks", [])
        ],
    }


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several pytest-benchmark runs as one: all benchmarks, the first run's machine info and time, the load
    average at the start of the first and at the end of the last run."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    out["benchmarks"] = [b for r in runs for b in r.get("benchmarks", [])]
    mi = dict(out.get("machine_info", {}))
    d = dict(mi.get("dgg_fused", {}))
    d["loadavg_end"] = runs[-1].get("machine_info", {}).get("dgg_fused", {}).get("loadavg_end")
    mi["dgg_fused"] = d
    out["machine_info"] = mi
    return out


def _newest_json() -> Path:
    files = sorted(Path(".benchmarks").rglob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        sys.exit("no JSON given and none under .benchmarks/ (run pytest with --benchmark-json=FILE or "
                 "--benchmark-autosave)")
    return files[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="*", type=Path,
                    help="pytest-benchmark JSON file(s) (default: newest under .benchmarks/); several are merged")
    ap.add_argument("--out", type=Path, help="write the markdown here instead of stdout")
    ap.add_argument("--save-compact", type=Path, metavar="FILE",
                    help="also write the fields the report uses to FILE (e.g. docs/benchmarks-cpu.json)")
    args = ap.parse_args(argv)
    paths = args.json or [_newest_json()]
    data = merge([json.loads(p.read_text()) for p in paths])
    text = render(data)
    if args.save_compact:
        args.save_compact.write_text(json.dumps(compact(data), sort_keys=True, separators=(",", ":")) + "\n")
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
