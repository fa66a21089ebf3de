# Two entry points that work on a fresh machine with only Python 3.11:
#   make demo   -> installs into .venv, builds a sample FORCE cube, trains a small LSTM, runs the pipeline
#   make test   -> installs into .venv (with test extras), checks style (ruff), runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/python -m pip
# torch is pinned here (a CPU wheel is on local disk); the package metadata keeps a range.
TORCH  ?= torch==2.13.0

.PHONY: install install-test demo test lint bench gpu-check plan-demo clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[s3]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test,s3,k8s]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/python -m treesits_dask demo --workdir demo-output

test: install-test lint
	$(VENV)/bin/python -m pytest

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(VENV)/bin/python -m treesits_dask bench

# the device check (issue 15): on a GPU machine with a CUDA build of torch (PYTHON=...)
gpu-check:
	benchmarks/gpu_check.sh --json gpu_check.json

clean:
	rm -rf demo-output .pytest_cache
