#!/usr/bin/env bash
# `make bench-gpu`: the whole GPU check in one command on a CUDA machine (H100/H200), with whatever Python holds torch
# and triton there (PY; `make bench-gpu` passes .venv/bin/python when a venv exists, else python3: a lent GPU machine
# has no network, so nothing is installed): benchmarks/gpu_check.sh (device and versions, the extension built in
# place with its CUDA kernels, every gpu-marked test), then the GPU benchmark suites at full size, then the README
# table with the device name. Measured on one H200 (2026-12-04, torch 2.11+cu130): about 2.5 minutes in all (build
# 15 s, tests 35 s, benchmarks 80 s). Knobs: PY, BENCH_GPU_JSON (results file), MAX_JOBS, and the DGG_BENCH_* variables
# of benchmarks/_common.py (the defaults below trade pair counts for time; set them higher for tighter ratios).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PY PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${BENCH_GPU_JSON:-bench-gpu.json}
t0=$(date +%s)
phase() { echo; echo "== bench-gpu: $1 ($(( $(date +%s) - t0 )) s so far)"; }

benchmarks/gpu_check.sh
status=$?
[ "$status" -eq 2 ] && exit 2  # no usable GPU build: nothing to benchmark

phase "GPU benchmarks"
DGG_BENCH_DEVICE=cuda \
DGG_BENCH_ENERGY_PAIR_BUDGET_S=${DGG_BENCH_ENERGY_PAIR_BUDGET_S:-0.3} \
DGG_BENCH_PAIR_BUDGET_S=${DGG_BENCH_PAIR_BUDGET_S:-1.5} \
DGG_BENCH_ROUNDS=${DGG_BENCH_ROUNDS:-8} \
"$PY" -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-only --benchmark-max-time=0.25 \
    --benchmark-json="$OUT" || status=1

phase "README table ($OUT)"
"$PY" benchmarks/report.py "$OUT" || status=1
echo
echo "== bench-gpu: done in $(( $(date +%s) - t0 )) s (status $status)"
exit $status
