#!/usr/bin/env bash
# The real-LM runs of docs/reallm.md for task `sum`, in the protocol's order; resumable (re-run to continue).
# 1. the LR scan (naive K=4 and K=1, seed 0) -> results/reallm-scan/runs.jsonl
# 2. the regime rule (results/reallm-sum/regime.py) picks the harmful and the benign lr from the scan
# 3. harmful regime: k1, naive (observed: the harm oracle), kl, dgg, seeds 0-2 -> results/reallm-sum/harmful/
# 4. benign regime: k1, naive (observed), seeds 0-2 -> results/reallm-sum/benign/
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
COMMON=(--policy smollm2-135m --preset measure --task sum --jobs 2 --cache-dir runs/cache --resume --no-plots --no-progress)
$PY -m dgg_fused.demo "${COMMON[@]}" --lr 1e-6,3e-6,1e-5,3e-5 --arms k1,naive --seeds 0 --out results/reallm-scan
read -r HARM BENIGN < <($PY results/reallm-sum/regime.py results/reallm-scan/runs.jsonl)
echo "harmful lr: $HARM  benign lr: $BENIGN"
if [ "$HARM" = none ]; then
  $PY -m dgg_fused.demo "${COMMON[@]}" --lr 1e-4 --arms k1,naive --seeds 0 --out results/reallm-scan
  read -r HARM BENIGN < <($PY results/reallm-sum/regime.py results/reallm-scan/runs.jsonl)
  echo "after the 1e-4 step: harmful lr: $HARM  benign lr: $BENIGN"
fi
if [ "$HARM" != none ]; then
  $PY -m dgg_fused.demo "${COMMON[@]}" --lr "$HARM" --arms k1,naive,kl,dgg --seeds 0-2 --out results/reallm-sum/harmful
fi
if [ "$BENIGN" != none ]; then
  $PY -m dgg_fused.demo "${COMMON[@]}" --lr "$BENIGN" --arms k1,naive --seeds 0-2 --out results/reallm-sum/benign
fi
