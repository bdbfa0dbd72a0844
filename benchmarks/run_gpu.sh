#!/usr/bin/env bash
# `make bench-gpu`: the whole GPU check in one command on a CUDA machine (H100/H200), after `make venv` has built
# the extension (with its CUDA kernels): the GPU tests, the GPU benchmark suites at full size, then the README
# table with the device name. Budget: < 8 minutes on one H100/H200 including the build; each phase prints the
# seconds spent so far. Knobs: PY (interpreter), BENCH_GPU_JSON (results file), and the DGG_BENCH_* variables of
# benchmarks/_common.py (the defaults below trade pair counts for time; set them higher for tighter ratios).
# Time estimate (not yet measured: no GPU was lent): venv + build 2-4 min, GPU tests ~1-2 min, energy suite (99
# cases) ~2 min, step suite (24 cases at 2^30 parameters) ~3 min.
set -uo pipefail
PY=${PY:-.venv/bin/python}
OUT=${BENCH_GPU_JSON:-bench-gpu.json}
t0=$(date +%s)
phase() { echo; echo "== bench-gpu: $1 ($(( $(date +%s) - t0 )) s so far)"; }
status=0

phase "device and extension"
"$PY" - <<'PYEOF' || exit 2
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("make bench-gpu: torch sees no CUDA device (this target is for a GPU machine; `make bench` runs the CPU suite)")
from dgg_fused.ops import available_backends, extension

backends = available_backends("cuda")
if "cuda" not in backends:
    sys.exit(f"make bench-gpu: dgg_fused._C has no CUDA kernels ({extension.load_error()}); rebuild with `make venv`")
p = torch.cuda.get_device_properties(0)
print(f"device: {torch.cuda.get_device_name(0)}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}; backends {backends}")
PYEOF

phase "GPU tests"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_kernels.py tests/test_optimizer_gpu.py || status=1

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
