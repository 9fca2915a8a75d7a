# The README's two commands:  `make demo`  and  `make test`.
# Each creates .venv if missing, installs the project once (stamp files; a change to
# pyproject.toml reinstalls), sets the environment the native parts need, then runs.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

# hnswlib builds from source: no -march=native, so the build runs on other CPUs too.
export HNSWLIB_NO_NATIVE := 1
# numba caches compiled kernels; the directory must be writable.
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-slow mutation lint install-dev install-demo clean

demo: $(VENV)/.stamp-demo
	$(BIN)/reverie demo $(ARGS)

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(VENV)/.stamp-dev
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# Mutation testing of agent/ (not part of `make test`; docs/mutation.md): each module in
# its own copy of the tree against the tests mapped to it in tests/mutation.py.
# make mutation MUTATE="agent/protocol.py agent/scheduler.py"
mutation: $(VENV)/.stamp-dev
	$(BIN)/python -m tests.mutation $(MUTATE)

lint: $(VENV)/.stamp-dev
	$(BIN)/ruff check agent export firmware_sim tests

install-dev: $(VENV)/.stamp-dev
install-demo: $(VENV)/.stamp-demo

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "reverie needs Python >= 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-demo: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -e '.[train,sim]'
	@touch $@

$(VENV)/.stamp-dev: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -e '.[train,sim,dev]'
	@touch $@ $(VENV)/.stamp-demo

clean:
	rm -rf $(VENV) .cache .pytest_cache .reverie
