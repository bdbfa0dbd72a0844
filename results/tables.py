"""The README's and docs' result tables, printed from a report's results.json (no training, no hand-copying).

    python results/tables.py results/toy-grid-report/results.json
"""

import json
import sys

ARMS = [("naive", "naive K=4"), ("k2", "fixed K=2"), ("kl", "KL early stop"), ("dgg", "DGG (paper)"),
        ("dgg-or-kl", "DGG OR KL")]
TASK_ORDER = ["addition2", "reversal5", "product2x1"]


def fmt(e):
    if e is None or e["value"] != e["value"]:
        return "-"
    return f"{e['value']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]".replace("-", "−")


def main(path, lrs=(0.0003, 0.001)):
    table = json.load(open(path))["table"]
    by = {(r["task"], r["lr"], r["arm"]): r for r in table}
    arms = [a for a in ARMS if any(k[2] == a[0] for k in by)]
    print("| task | lr | " + " | ".join(n for _, n in arms) + " |")
    print("|---|---|" + "---|" * len(arms))
    for lr in lrs:
        for t in TASK_ORDER:
            if (t, lr, "k1") not in by:
                continue
            print(f"| {t} | {lr:g} | "
                  + " | ".join(fmt(by[(t, lr, a)]["d_final_vs_k1"]) if (t, lr, a) in by else "-" for a, _ in arms)
                  + " |")
    print()
    print("Rollouts to K=1's final J (ratio of means, K=1 / arm):")
    for lr in lrs:
        for a, n in arms:
            xs = [by[(t, lr, a)]["x_rollouts_vs_k1"]["value"] for t in TASK_ORDER if (t, lr, a) in by]
            print(f"  lr {lr:g} {n}: " + " / ".join(f"{x:.2f}x" for x in xs))
    print()
    print("Trips per run (of 30 batches), lr 1e-3:")
    for a, n in arms:
        xs = [by[(t, 0.001, a)]["trips"] for t in TASK_ORDER if (t, 0.001, a) in by]
        print(f"  {n}: " + " / ".join(f"{x:.1f}" for x in xs))


if __name__ == "__main__":
    main(sys.argv[1])
