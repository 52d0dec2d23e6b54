# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use from the
# committed lock (requirements/locked.txt: torch 2.13.0, the CPU wheel this machine's installer serves, and the
# exact version of every other package), then build this package's C++ extension with pip against that torch.
# `make lock` regenerates the lock from pyproject.toml; `make test-latest` runs the suite on the newest releases
# the ranges in pyproject.toml allow, in .venv-latest, so upstream drift is seen on purpose.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.meancache-installed
LOCK := requirements/locked.txt
CONSTRAINTS := requirements/constraints.txt
PIP_TOOLS := pip-tools==7.7.0
LATEST := .venv-latest

.PHONY: setup demo test bench docs lock test-latest

setup: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml setup.py $(wildcard csrc/*.cpp)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet --no-build-isolation --no-deps --editable .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/meancache demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/pytest benchmarks --benchmark-enable --benchmark-only

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Every extra and build requirement of pyproject.toml, resolved at the newest versions its ranges allow with
# torch held by $(CONSTRAINTS); pip-compile prints torch's local label (+cpu), which the lock leaves out so that
# a CUDA machine's torch of the same version satisfies it too.
lock: $(STAMP)
	$(BIN)/pip install --quiet $(PIP_TOOLS)
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --upgrade --no-build-isolation --all-extras --all-build-deps --allow-unsafe \
		--strip-extras --annotation-style line --no-emit-index-url --no-emit-find-links \
		--constraint $(CONSTRAINTS) --output-file $(LOCK) pyproject.toml
	sed -i -E 's/^torch==([0-9.]+)\+[a-z0-9]+/torch==\1/' $(LOCK)

# The newest releases that pyproject.toml allows, torch held at the lock's version (a newer torch is a CUDA build
# of several GB here). What it resolved is written to $(LATEST)/resolved.txt.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip setuptools wheel ninja
	$(LATEST)/bin/pip install --quiet --constraint $(CONSTRAINTS) torch
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager --constraint $(CONSTRAINTS) \
		--no-build-isolation --editable ".[test,bench,docs]"
	$(LATEST)/bin/pip freeze --exclude-editable > $(LATEST)/resolved.txt
	$(LATEST)/bin/pytest
