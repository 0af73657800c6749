# `make run`: set up (once) and run the default scenario. `make test`: set up (once), check, and test.
# torch is pinned here, not in pyproject.toml: on a CPU machine 2.13.0 is the CPU
# wheel already on disk, where an open range would pull gigabytes of CUDA packages.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: run test test-fast lint
run: $(VENV)/.installed
	$(PY) run.py $(ARGS)

# The whole suite, after the checks (CI runs this).
test: lint
	$(PY) -m pytest -q $(ARGS)

# The development loop: every module's fast tests, no real Ray, no slow tests.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow and not ray" $(ARGS)

# Style and structure: ruff's checks and format, and the layer contracts of pyproject.toml.
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[test]"
	touch $@
