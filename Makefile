# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv at the repo root when missing and install the project into it.
# `make gpu-check` (benchmarks/gpu_check.py) is the one prepared check for a machine with a GPU.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SHARED ?= ../shared
DEMO_OUT ?= demo_out
STAMP  := $(VENV)/.installed
# gpu-check runs with .venv's python where there is one, else $(PYTHON): the GPU machine has no .venv but a
# python3 with torch, triton, timm and pytest installed (nothing can be downloaded there)
GPU_CHECK_PY   ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_ARGS ?=

.PHONY: demo test install clean gpu-check

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first: the extension is built against the installed torch (no build isolation).
	$(PY) -m pip install "torch>=2.4" setuptools wheel pybind11 ninja
	$(PY) -m pip install --no-build-isolation -e ".[dev,triton,test]"
	touch $(STAMP)

install: $(STAMP)

# The demo's images: 20 CIFAR-10 test images from $(SHARED), or, where $(SHARED) is absent, the five sample
# photographs shipped in the package (rollout_fast/assets/samples, public domain / CC0).
DEMO_IMAGES = $(or $(wildcard $(SHARED)/data/cifar10/test/*/000[0-1].jpg),rollout_fast/assets/samples)

demo: $(STAMP)
	@test -d $(SHARED)/data/cifar10/test || echo "make demo: $(SHARED)/data/cifar10/test not found: using the sample photographs shipped in rollout_fast/assets/samples"
	$(VENV)/bin/rollout-fast rollout $(DEMO_IMAGES) --student --overwrite --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

# Build in place for the device's arch, the tests that skip on the CPU, every benchmark, within 8 minutes;
# results in $$GPU_CHECK_OUT, else $$OUT, else benchmarks/results/<date>-<device>/. Without a GPU: the build
# and a dry run of every step. E.g. make gpu-check GPU_CHECK_ARGS="--dry-run --skip-build"
gpu-check:
	$(GPU_CHECK_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_OUT)
