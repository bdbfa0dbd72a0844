#!/usr/bin/env bash
# The tables and plots of docs/reallm.md from the committed runs (no training): the demo's report over both regimes,
# and P1 (DWD) per lr. docs/img/reallm_*.png are copies of the plots it writes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
$PY -m dgg_fused.demo --from-runs results/reallm-sum/harmful/runs.jsonl results/reallm-sum/benign/runs.jsonl \
  --out results/reallm-sum/report
$PY results/reallm-sum/dwd.py results/reallm-sum/harmful/runs.jsonl results/reallm-sum/benign/runs.jsonl \
  | tee results/reallm-sum/report/dwd.md
