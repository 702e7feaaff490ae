# Everything runs in the project's own virtualenv (.venv), created on first use from a plain Python.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-all demo clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	# The CPU build of torch first (the parity references); everything else resolves around it.
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(STAMP)

# The default suite: CPU, tiny configs, < 10 minutes on 2 cores. Tests marked `slow` are left out.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m uvigu.demo

clean:
	rm -rf $(VENV) runs .pytest_cache
