# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   -- the main job (the RLVR reuse demo)
#   make test   -- the test suite (what CI runs, via .ci/run)
#   make bench-gpu -- on a CUDA machine: build, GPU tests, GPU benchmarks, the README table (< 8 min on an H100/H200)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is the CUDA build (runs on CPU too) and brings triton, which the Triton tests run interpreted.
TORCH_SPEC ?= torch==2.14.1

.PHONY: venv test demo bench bench-gpu clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cpp csrc/cuda/*.cu csrc/cuda/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,trl]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: venv
	$(PY) -m dgg_fused.demo

bench: venv
	$(PY) -m pytest benchmarks/ --benchmark-only

bench-gpu: venv
	PY=$(PY) benchmarks/run_gpu.sh

clean:
	rm -rf $(VENV) build *.egg-info
