#!/usr/bin/env bash
# The GPU check of this tree, in one command, on a CUDA machine with torch and triton installed (no network, no
# virtual environment: the interpreter given as PY, python3 by default):
#
#   benchmarks/gpu_check.sh            # build the extension in place (CUDA + CPU), then every gpu-marked test
#
# It prints the device and versions, builds dgg_fused._C in place (`setup.py build_ext --inplace`: no install, the
# tree's own dgg_fused is the one imported), checks the build has CUDA kernels, and runs the tests marked `gpu`
# (tests/test_gpu_kernels.py, tests/test_optimizer_gpu.py, the CUDA-graph test of tests/test_compile.py).
# Expected time on one H100/H200: build 2-4 min, tests about 1 min. Knobs: PY, MAX_JOBS (default 8),
# TORCH_CUDA_ARCH_LIST (default 9.0), PYTEST_ARGS (extra pytest arguments, e.g. "-x -k 2_31").
# Exit status: 0 when everything passed, 1 when a test failed, 2 when there is no usable GPU build.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
phase() { echo; echo "== gpu_check: $1 ($(( $(date +%s) - t0 )) s so far)"; }

phase "device and versions"
"$PY" - <<'PYEOF' || exit 2
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
p = torch.cuda.get_device_properties(0)
print(f"device: {torch.cuda.get_device_name(0)}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, python {sys.version.split()[0]}")
PYEOF

phase "build dgg_fused._C in place"
MAX_JOBS=${MAX_JOBS:-8} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} DGG_FUSED_NO_CUDA=0 \
    "$PY" setup.py -q build_ext --inplace || { echo "gpu_check: the build failed"; exit 2; }

phase "the build"
"$PY" - <<'PYEOF' || exit 2
import sys
from pathlib import Path

import dgg_fused
from dgg_fused.ops import available_backends, extension

here = Path.cwd().resolve()
if Path(dgg_fused.__file__).resolve().parent != here / "dgg_fused":
    sys.exit(f"gpu_check: imported {dgg_fused.__file__}, not this tree's dgg_fused")
backends = available_backends("cuda")
print(f"dgg_fused from {Path(dgg_fused.__file__).parent}; CUDA backends {backends}")
if "cuda" not in backends:
    sys.exit(f"gpu_check: dgg_fused._C has no CUDA kernels ({extension.load_error()})")
PYEOF

phase "GPU tests"
status=0
# shellcheck disable=SC2086
"$PY" -m pytest -q -p no:cacheprovider -m gpu -rs ${PYTEST_ARGS:-} \
    tests/test_gpu_kernels.py tests/test_optimizer_gpu.py tests/test_compile.py || status=1

phase "done (status $status)"
exit $status
