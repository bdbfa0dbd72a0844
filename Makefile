# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   -- the main job (the RLVR reuse demo)
#   make test   -- the test suite (what CI runs, via .ci/run)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is the CUDA build (runs on CPU too) and brings triton, which the Triton tests run interpreted.
TORCH_SPEC ?= torch==2.14.1

.PHONY: venv test demo bench clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cpp csrc/cuda/*.cu csrc/cuda/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" setuptools wheel
	DS_ACCELERATOR=cpu DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e ".[dev,trl,deepspeed]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: venv
	$(PY) -m dgg_fused.demo

bench: venv
	$(PY) -m pytest benchmarks/ --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info
