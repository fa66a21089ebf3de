# Two entry points that work on a fresh machine with only Python 3.11:
#   make demo   -> installs into .venv, builds a sample FORCE cube, trains a small LSTM, runs the pipeline
#   make test   -> installs into .venv (with test extras), checks style (ruff), runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/python -m pip
# torch is pinned here (a CPU wheel is on local disk); the package metadata keeps a range.
TORCH  ?= torch==2.13.0
# kubernetes-validate 1.28.3 is the last release with the Kubernetes 1.23 and 1.24 schemas: its
# files go beside the newest release (tests/k8s_schemas.py validates 1.23 to the newest with them)
K8S_OLD_SCHEMAS ?= kubernetes-validate==1.28.3

.PHONY: install install-test demo test lint bench gpu-check plan-demo clean lock

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[s3]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test,s3,k8s]'
	rm -rf $(VENV)/k8s-schemas
	$(PIP) install -q --no-deps --target $(VENV)/k8s-schemas '$(K8S_OLD_SCHEMAS)'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/python -m treesits_dask demo --workdir demo-output

# the suite runs on TEST_WORKERS pytest-xdist processes, a test module per process at a time (its
# module-scoped clusters and cubes are made once), the longest modules first (tests/conftest.py)
TEST_WORKERS ?= 2

test: install-test lint
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The images' lock files (cluster/Dockerfile): the runtime extras of pyproject.toml plus
# cluster/image.in, with hashes, for Linux x86_64 and Python 3.11.  The CPU image takes torch's
# CPU build from the PyTorch index (LOCK_FIND_LINKS: a local folder with that wheel instead).
LOCK_INDEX       ?= https://pypi.org/simple
TORCH_CPU_INDEX  ?= https://download.pytorch.org/whl/cpu
LOCK_FIND_LINKS  ?=
LOCK_TORCH       ?= 2.13.0
UV_COMPILE = UV_NO_CONFIG=1 $(VENV)/bin/uv pip compile pyproject.toml cluster/image.in \
	--extra s3 --extra k8s --generate-hashes --no-header --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --index-url $(LOCK_INDEX)

lock: install-test
	$(PIP) install -q -e '.[lock]'
	$(UV_COMPILE) $(if $(LOCK_FIND_LINKS),--find-links $(LOCK_FIND_LINKS),--extra-index-url $(TORCH_CPU_INDEX) --index-strategy unsafe-best-match) \
		-P 'torch==$(LOCK_TORCH)+cpu' -o cluster/requirements-cpu.lock
	sed -i '/^--find-links/d;/^--extra-index-url/d' cluster/requirements-cpu.lock
	$(UV_COMPILE) -P 'torch==$(LOCK_TORCH)' -o cluster/requirements-cuda.lock

bench: install
	$(VENV)/bin/python -m treesits_dask bench

# the device check (issue 15): on a GPU machine with a CUDA build of torch (PYTHON=...)
gpu-check:
	benchmarks/gpu_check.sh --json gpu_check.json

clean:
	rm -rf demo-output .pytest_cache
