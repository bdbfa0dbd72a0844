"""Compare the runs of two runs.jsonl files bit for bit (every per-batch J, reward, count, the harm oracle's
per-step records), ignoring wall-clock fields and fields the reference lacks; ``--skip FIELD`` leaves a top-level field out (repeatable).

    python results/portable-check/compare.py REFERENCE.jsonl CHECK.jsonl [--skip weight_change]

Every run of CHECK must be in REFERENCE (same task, lr, arm, seed); exits 1 on any difference.
"""
import argparse
import json
import math
import sys


def load(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        out[(r["task"], r["lr"], r["arm"], r["seed"])] = r
    return out


def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k != "wall"}
    if isinstance(x, list):
        return [strip(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return x


def main():
    p = argparse.ArgumentParser()
    p.add_argument("reference")
    p.add_argument("check")
    p.add_argument("--skip", action="append", default=["_meta"])
    a = p.parse_args()
    ref, chk = load(a.reference), load(a.check)
    bad = 0
    extra = set()
    for key, r in sorted(chk.items(), key=str):
        if key not in ref:
            print("missing in reference:", key)
            bad += 1
            continue
        fields = [f for f in r if f not in a.skip and f in ref[key]]
        extra.update(f for f in r if f not in a.skip and f not in ref[key])
        diff = [f for f in fields if strip(r[f]) != strip(ref[key].get(f))]
        if diff:
            print("DIFFERS:", key, diff)
            bad += 1
    if extra:
        print("fields only in CHECK (metadata the reference's code did not write yet), not compared:", sorted(extra))
    print(f"{len(chk)} runs compared, {len(chk) - bad} identical, {bad} differ or missing (skipped: {a.skip})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
