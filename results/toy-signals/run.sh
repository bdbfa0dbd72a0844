#!/usr/bin/env bash
# The candidate arms of docs/signals.md (oracle, C1..C6) on the toy grid's cells; resumable (re-run to continue).
# k1, k2, naive, kl, dgg and dgg-or-kl of the same cells are results/toy-grid (same configuration and numerics).
# C1 ess, C2 m2, C3 tv, C4 decay, C5 ess-scale: thresholds from results/toy-grid/calibration.json; C6 kl15 = klgate 0.03.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
$PY -m dgg_fused.demo --task addition --task reversal --task product --lr 3e-4,6e-4,1e-3 --seeds 0-7 \
  --arms oracle,klgate:target_kl=0.03 \
  --arm 'gate:energy=false,drift=ess,drift_threshold=0.97' \
  --arm 'gate:energy=false,drift=log_ratio_m2,drift_threshold=0.066' \
  --arm 'gate:energy=false,drift=tv,drift_threshold=0.043' \
  --arm 'gate:energy=false,drift=energy_decay,drift_threshold=0.085' \
  --arm 'gate:energy=false,drift=ess,drift_threshold=0.97,action=scale' \
  --jobs "${JOBS:-2}" --out results/toy-signals --cache-dir runs/cache --no-plots --no-progress --resume "$@"
