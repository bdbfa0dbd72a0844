#!/usr/bin/env bash
# The portability check of docs/demo.md: rerun part of the toy grid and of the signals grid on a fresh cache with
# an emulated other CPU in the caller's environment (the workers pin their own numerics and must ignore it), and
# compare every run bit for bit with the committed runs.jsonl files.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/portable-check}
rm -rf "$OUT"
export ATEN_CPU_CAPABILITY=default MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=SSE41 DGG_FUSED_CPU_ISA=portable OMP_NUM_THREADS=2
# 18 toy-grid runs: seed 0, the collapse lr 1e-3, 3 tasks x the 6 arms
$PY -m dgg_fused.demo --task addition --task reversal --task product --lr 1e-3 --seeds 0 \
  --arms k1,k2,naive,kl,dgg,dgg-or-kl --jobs 2 --out "$OUT/grid" --cache-dir "$OUT/cache" --no-plots --no-progress
# the signals grid's 7 arms on one cell (addition, lr 1e-3, seed 0)
$PY -m dgg_fused.demo --task addition --lr 1e-3 --seeds 0 --arms oracle,klgate:target_kl=0.03 \
  --arm 'gate:energy=false,drift=ess,drift_threshold=0.97' \
  --arm 'gate:energy=false,drift=log_ratio_m2,drift_threshold=0.066' \
  --arm 'gate:energy=false,drift=tv,drift_threshold=0.043' \
  --arm 'gate:energy=false,drift=energy_decay,drift_threshold=0.085' \
  --arm 'gate:energy=false,drift=ess,drift_threshold=0.97,action=scale' \
  --jobs 2 --out "$OUT/signals" --cache-dir "$OUT/cache" --no-plots --no-progress
# weight_change: the committed toy grid computed it before the norms group was split out (docs/ablation.md)
$PY results/portable-check/compare.py results/toy-grid/runs.jsonl "$OUT/grid/runs.jsonl" --skip weight_change
$PY results/portable-check/compare.py results/toy-signals/runs.jsonl "$OUT/signals/runs.jsonl"
