# `make test` and `make demo` build their own virtual environment in .venv. torch==2.13.0 is
# installed first, on its own, so that nothing that depends on torch can pull a CUDA build.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: test test-all demo bench gpu-check clean

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	CPMCTL_SLOW=1 $(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/cpmctl run recipes/demo.toml runs/demo --force

bench: $(STAMP)
	$(PY) benchmarks/forward.py

# Every GPU figure in one run of under 8 minutes (gpu-check/results.json and results.md). It runs
# from the checkout with the machine's own python and packages: no venv, no pip, no network.
# REHEARSE=1: the same sections on CPU at tiny shapes (Triton's interpreter), as CI runs them.
GPU_CHECK_PYTHON ?= python3
gpu-check:
	PYTHONPATH=.:kernels$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_CHECK_PYTHON) -m cpmctl.gpu_check $(if $(REHEARSE),--rehearse)

clean:
	rm -rf $(VENV) build *.egg-info
