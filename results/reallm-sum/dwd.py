"""P1 of docs/reallm.md (DWD) from runs.jsonl files: per run, the lm_head's relative weight change (tied: the
embedding) divided by the body's, and naive K=4's ratio over K=1's (means over seeds) per lr.

    python results/reallm-sum/dwd.py results/reallm-sum/harmful/runs.jsonl results/reallm-sum/benign/runs.jsonl

The runs record the relative change per module group (‖W_T − W_0‖ / ‖W_0‖ of the group), not of the union of
attention and MLP, so the body is each of the two: the ratio is printed against attention and against MLP.
"""
import json
import statistics
import sys
from collections import defaultdict

runs = defaultdict(list)
for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        if r["arm"] in ("k1", "naive"):
            runs[(r["lr"], r["arm"])].append(r)

print("| lr | arm | seeds | lm_head (tied) | attention | MLP | norms | lm_head rows used / unused | "
      "lm_head / attention | lm_head / MLP |")
print("|---|---|---|---|---|---|---|---|---|---|")
ratio = {}
for (lr, arm), rs in sorted(runs.items()):
    m = {g: statistics.fmean(r["weight_change"][g] for r in rs)
         for g in ("lm_head", "attention", "mlp", "norms", "lm_head/used", "lm_head/unused")}
    ra = statistics.fmean(r["weight_change"]["lm_head"] / r["weight_change"]["attention"] for r in rs)
    rm = statistics.fmean(r["weight_change"]["lm_head"] / r["weight_change"]["mlp"] for r in rs)
    ratio[(lr, arm)] = (ra, rm)
    print(f"| {lr:g} | {arm} | {len(rs)} | {m['lm_head']:.2e} | {m['attention']:.2e} | {m['mlp']:.2e} | "
          f"{m['norms']:.2e} | {m['lm_head/used']:.2e} / {m['lm_head/unused']:.2e} | {ra:.2f} | {rm:.2f} |")
print()
for lr in sorted({lr for lr, _ in ratio}):
    if (lr, "naive") in ratio and (lr, "k1") in ratio:
        na, nm = ratio[(lr, "naive")]
        ka, km = ratio[(lr, "k1")]
        print(f"lr {lr:g}: naive's ratio / K=1's = {na / ka:.2f} (vs attention), {nm / km:.2f} (vs MLP); "
              f"P1 (>= 1.5) {'holds' if min(na / ka, nm / km) >= 1.5 else 'does not hold'}")
