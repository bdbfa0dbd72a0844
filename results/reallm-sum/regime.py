"""The pre-registered regime rule of docs/reallm.md, applied to the LR scan's runs.jsonl.

"final J" as everywhere in the testbed: the mean J of the last 5 rollout batches.
benign = the largest scanned lr where naive's final J exceeds K=1's by more than 0.01;
harmful = the smallest scanned lr where naive's final J is below K=1's by more than 0.01.
Prints "HARMFUL BENIGN" (an lr, or "none" for each) and, on stderr, the scan table.
"""
import json
import statistics
import sys

from dgg_fused.demo.report import FINAL_BATCHES  # "final J": the mean J of the last FINAL_BATCHES rollout batches

final = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    j = [h["expected"] for h in r["history"][1:]]
    final[(r["arm"], r["lr"])] = statistics.fmean(j[-FINAL_BATCHES:])
lrs = sorted({lr for _, lr in final})
harmful = benign = None
for lr in lrs:
    if ("naive", lr) not in final or ("k1", lr) not in final:
        print(f"lr {lr:g}: not complete", file=sys.stderr)
        continue
    d = final[("naive", lr)] - final[("k1", lr)]
    print(f"lr {lr:g}: naive {final[('naive', lr)]:.4f}  k1 {final[('k1', lr)]:.4f}  naive-k1 {d:+.4f}", file=sys.stderr)
    if d > 0.01:
        benign = lr
    if d < -0.01 and harmful is None:
        harmful = lr
fmt = lambda x: "none" if x is None else f"{x:g}"
print(fmt(harmful), fmt(benign))
