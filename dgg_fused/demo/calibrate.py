"""``python -m dgg_fused.demo.calibrate RUNS.jsonl...``: gate thresholds from the harm oracle, by a rule fixed in advance.

The rule (pre-registered in docs/signals.md): for each signal, pool every reuse step (k > 1) of the observed runs
(the naive K=4 arm's harm-oracle records), label a step harmful when its exact change of expected reward is < 0,
and take the threshold that maximises Youden's index TPR − FPR for "harmful" in the signal's harm direction (a step
trips when the signal is beyond the threshold: above it for a "high" signal, below it for a "low" one). The
threshold is the midpoint between two adjacent observed values, rounded to 2 significant digits; among equal
indices the one that trips fewer steps wins. TPR and FPR are reported at the rounded threshold.

Only per-step classification enters: no arm's expected reward. Output: JSON (``--out`` file, else stdout).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

from .report import SIGNALS, derived_steps

__all__ = ["Threshold", "youden_threshold", "calibrate", "CALIBRATED", "main"]

#: The signals the pre-registered candidates need thresholds for.
CALIBRATED = ("ess", "log_ratio_m2", "tv", "energy_decay")


@dataclass(frozen=True)
class Threshold:
    signal: str
    direction: str  # "high": trips when value > threshold; "low": when value < threshold
    threshold: float
    tpr: float
    fpr: float
    youden: float
    harmful: int
    beneficial: int


def _round_sig(x: float, digits: int = 2) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _rates(values: Sequence[float], harmful: Sequence[bool], t: float, direction: str) -> tuple[float, float]:
    trip = [(v > t) if direction == "high" else (v < t) for v in values]
    n_pos = sum(harmful)
    n_neg = len(harmful) - n_pos
    tp = sum(1 for tr, h in zip(trip, harmful) if tr and h)
    fp = sum(1 for tr, h in zip(trip, harmful) if tr and not h)
    return tp / n_pos, fp / n_neg


def youden_threshold(values: Sequence[float], harmful: Sequence[bool], direction: str, *,
                     signal: str = "") -> Threshold:
    """The Youden-optimal threshold of ``values`` for ``harmful`` in ``direction`` (see the module doc).

    Raises ``ValueError`` for mismatched lengths, a bad direction, non-finite values, or when one class is empty.
    """
    if direction not in ("high", "low"):
        raise ValueError(f"direction must be 'high' or 'low', got {direction!r}")
    if len(values) != len(harmful):
        raise ValueError(f"{len(values)} values for {len(harmful)} labels")
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"{signal or 'signal'}: non-finite values")
    n_pos = sum(bool(h) for h in harmful)
    n_neg = len(harmful) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{signal or 'signal'}: need both harmful and beneficial steps ({n_pos} / {n_neg})")
    sign = 1.0 if direction == "high" else -1.0
    # in the "high" frame a step trips when s = sign * value > threshold; sweep thresholds from above the maximum down
    pts = sorted(((sign * v, bool(h)) for v, h in zip(values, harmful)), reverse=True)
    best = (0.0, 0, math.inf)  # (youden, trips, threshold in the high frame): nothing trips above the maximum
    tp = fp = 0
    i = 0
    while i < len(pts):
        s = pts[i][0]
        while i < len(pts) and pts[i][0] == s:  # every step with this value trips together
            tp += pts[i][1]
            fp += not pts[i][1]
            i += 1
        nxt = pts[i][0] if i < len(pts) else s - 1.0
        j = tp / n_pos - fp / n_neg
        if j > best[0] + 1e-15:  # strictly better; ties keep the earlier (fewer trips) threshold
            best = (j, tp + fp, (s + nxt) / 2.0)
    t = _round_sig(sign * best[2]) if math.isfinite(best[2]) else sign * math.inf
    tpr, fpr = _rates(values, harmful, t, direction)
    return Threshold(signal, direction, t, tpr, fpr, tpr - fpr, n_pos, n_neg)


def _reuse_steps(runs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        if r.get("steps"):
            out.extend(s for s in derived_steps(r["steps"]) if s["reuse_index"] > 1)
    return out


def calibrate(runs: Sequence[Mapping[str, Any]], signals: Sequence[str] = CALIBRATED) -> list[Threshold]:
    """Thresholds for ``signals`` from the observed runs' reuse steps (the pre-registered rule)."""
    steps = _reuse_steps(runs)
    direction = dict(SIGNALS)
    out = []
    for sig in signals:
        rows = [s for s in steps if s.get(sig) is not None and math.isfinite(float(s[sig]))]
        if not rows:
            raise ValueError(f"calibrate: no reuse step records {sig!r} (runs without the harm oracle?)")
        out.append(youden_threshold([float(s[sig]) for s in rows], [float(s["delta"]) < 0 for s in rows],
                                    direction[sig], signal=sig))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dgg_fused.demo.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="runs.jsonl file(s) with harm-oracle runs")
    p.add_argument("--arm", default="naive", help="the observed arm whose steps calibrate (default: naive)")
    p.add_argument("--signals", default=",".join(CALIBRATED), help="comma-separated signals")
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    args = p.parse_args(argv)
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.extend(d for d in (json.loads(line) for line in f if line.strip()) if d["arm"] == args.arm)
    th = calibrate(runs, [s.strip() for s in args.signals.split(",") if s.strip()])
    doc = {"rule": "Youden-optimal threshold over pooled reuse steps (k > 1), harmful = dJ < 0, 2 significant "
                   "digits (docs/signals.md)", "arm": args.arm, "runs": len(runs),
           "cells": sorted({f"{r['task']} lr={r['lr']:g}" for r in runs}),
           "thresholds": {t.signal: asdict(t) for t in th}}
    text = json.dumps(doc, indent=2) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
