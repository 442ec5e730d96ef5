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

# The demo's images: 16 Imagenette val photographs from $(SHARED) across the 10 classes (the first two of the
# first six classes' sorted files, the first of the other four), explained by the Imagenette teacher and its
# shipped student; where $(SHARED) is absent, the five sample photographs shipped in the package
# (rollout_fast/assets/samples, public domain / CC0).
DEMO_PHOTOS = n01440764/ILSVRC2012_val_00009111.jpg n01440764/ILSVRC2012_val_00009191.jpg \
	n02102040/ILSVRC2012_val_00004650.jpg n02102040/ILSVRC2012_val_00007032.jpg \
	n02979186/ILSVRC2012_val_00008651.jpg n02979186/ILSVRC2012_val_00020400.jpg \
	n03000684/ILSVRC2012_val_00004262.jpg n03000684/ILSVRC2012_val_00007460.jpg \
	n03028079/ILSVRC2012_val_00003351.jpg n03028079/ILSVRC2012_val_00003682.jpg \
	n03394916/ILSVRC2012_val_00001492.jpg n03394916/ILSVRC2012_val_00003620.jpg \
	n03417042/ILSVRC2012_val_00002210.jpg n03425413/ILSVRC2012_val_00000732.jpg \
	n03445777/ILSVRC2012_val_00008161.jpg n03888257/ILSVRC2012_val_00001440.jpg
DEMO_IMAGES = $(or $(wildcard $(addprefix $(SHARED)/data/imagenette/val/,$(DEMO_PHOTOS))),rollout_fast/assets/samples)

demo: $(STAMP)
	@test -d $(SHARED)/data/imagenette/val || echo "make demo: $(SHARED)/data/imagenette/val not found: using the sample photographs shipped in rollout_fast/assets/samples"
	$(VENV)/bin/rollout-fast rollout $(DEMO_IMAGES) --model imagenette-vit --student --overwrite --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

# Build in place for the device's arch, the tests that skip on the CPU, every benchmark, within 8 minutes;
# results in $$GPU_CHECK_OUT, else $$OUT, else benchmarks/results/<date>-<device>/. Without a GPU: the build
# and a dry run of every step. E.g. make gpu-check GPU_CHECK_ARGS="--dry-run --skip-build"
gpu-check:
	$(GPU_CHECK_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_OUT)
