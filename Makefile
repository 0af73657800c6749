# `make run`: set up (once) and run the default scenario. `make test`: set up (once) and test.
# torch is pinned here, not in pyproject.toml: on a CPU machine 2.13.0 is the CPU
# wheel already on disk, where an open range would pull gigabytes of CUDA packages.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: run test
run: $(VENV)/.installed
	$(PY) run.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[test]"
	touch $@
