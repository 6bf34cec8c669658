# Set-up on a fresh machine happens here: `make demo` (the main job) and `make test` (the test suite)
# create .venv when missing and install everything they need into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flatlora-installed
# the core install at its declared floors, no extra (constraints-floor.txt): what `pip install flatlora` gives
CORE_VENV  := .venv-core
CORE_STAMP := $(CORE_VENV)/.flatlora-installed

.PHONY: setup setup-core demo map compare test test-core test-distributed bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/install_assets.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the local CPU wheel, never a multi-GB CUDA build
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	# DS_BUILD_OPS=0: DeepSpeed builds no CUDA op (its ZeRO tests run on CPU with gloo)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e ".[experiments,dev,train,deepspeed]"
	bash scripts/install_assets.sh $(PY)
	touch $@

setup-core: $(CORE_STAMP)

$(CORE_STAMP): pyproject.toml constraints-floor.txt
	rm -rf $(CORE_VENV)  # from scratch: nothing left over from an earlier install may hide a missing dependency
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install -q --upgrade pip
	$(CORE_VENV)/bin/python -m pip install -q -c constraints-floor.txt torch==2.13.0
	$(CORE_VENV)/bin/python -m pip install -q -c constraints-floor.txt -e .
	touch $@

demo: setup
	$(VENV)/bin/flatlora compare

# the regime map of docs/experiments.md (hours on a 2-core CPU; resumable: re-run to continue or to re-report)
map: setup
	$(VENV)/bin/flatlora compare --preset map-text-r8
	$(VENV)/bin/flatlora compare --preset map-vision
	$(VENV)/bin/flatlora compare --preset map-label-noise
	$(VENV)/bin/flatlora compare --preset map-text-r64

# the suite in the full environment, then the core install (no extra, floors) running scripts/core_check.py
test: setup
	$(PY) -m pytest -q -m "not slow"
	$(MAKE) test-core

test-core: setup-core
	$(CORE_VENV)/bin/python scripts/core_check.py

test-distributed: setup
	$(PY) -m pytest -q -m distributed

bench: setup
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) $(CORE_VENV) build src/*.egg-info .pytest_cache
