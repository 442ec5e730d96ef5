# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv at the repo root when missing and install the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SHARED ?= ../shared
DEMO_OUT ?= demo_out
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first: the extension is built against the installed torch (no build isolation).
	$(PY) -m pip install "torch>=2.4" setuptools wheel pybind11 ninja
	$(PY) -m pip install --no-build-isolation -e ".[dev,triton]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@test -d $(SHARED)/data/cifar10/test || { echo "make demo: $(SHARED)/data/cifar10/test not found (set SHARED=/path/to/shared)"; exit 1; }
	$(VENV)/bin/rollout-fast rollout $(wildcard $(SHARED)/data/cifar10/test/*/000[0-1].jpg) --student --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_OUT)
