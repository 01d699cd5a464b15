# One-command set-up: every target creates .venv when needed and installs into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/dnsproxy.yaml

.PHONY: run test lint typecheck unit venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/dnsproxy --config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check dnsproxy tests
	$(BIN)/ruff format --check dnsproxy tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Benchmarks (see benchmarks/README.md), never part of `make test`; CI runs bench-smoke.
.PHONY: bench bench-smoke
bench: $(STAMP)
	$(BIN)/pip install --quiet matplotlib
	$(BIN)/python -m benchmarks

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks --smoke
