# Everything runs in the project's own virtualenv (.venv), created on first use from a plain Python.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# Test files run in parallel processes (pytest-xdist, one file per worker: module fixtures stay shared). The suite is
# compile-bound, so 2 workers on 2 cores take about half the time of one.
PYTEST_WORKERS ?= 2

.PHONY: install test test-all demo clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	# The CPU build of torch first (the parity references); everything else resolves around it.
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(STAMP)

# The default suite: CPU, tiny configs, 8.5-18 minutes on 2 cores by VM (2 workers; 588 tests, 2026-12). Tests marked
# `slow` are left out. `--no-loadscope-reorder`: files go out in the order tests/conftest.py sets, longest first.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m uvigu.demo

clean:
	rm -rf $(VENV) runs .pytest_cache
