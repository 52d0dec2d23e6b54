# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use
# (CPU torch 2.13.0 from the local wheel, then this package with its C++ extension built by pip).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.meancache-installed

.PHONY: setup demo test bench docs

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 setuptools wheel ninja numpy
	$(BIN)/pip install --quiet --no-build-isolation --editable ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/meancache demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/pip install --quiet --no-build-isolation --editable ".[test,bench]"
	$(BIN)/pytest benchmarks --benchmark-enable --benchmark-only

docs: $(STAMP)
	$(BIN)/pip install --quiet --no-build-isolation --editable ".[test,docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
