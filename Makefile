# One-command set-up: every target creates .venv when needed and installs into it.
# The interpreter .venv is made from: the distribution's /usr/bin/python3 when it is
# 3.11 or newer and can make a venv (Debian builds it with PGO and LTO, which runs
# dnsproxy's query paths 10-25 % faster than a plain source build; see README), else
# the first python3 on PATH. Override with `make PYTHON=...` (after `make clean`).
PYTHON ?= $(shell for p in /usr/bin/python3 python3; do \
	$$p -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/dnsproxy.yaml

.PHONY: run test lint typecheck unit venv clean schema wheels image

# dnsproxy/__init__.py holds the version, which the installed metadata records.
$(STAMP): pyproject.toml dnsproxy/__init__.py
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

# The JSON Schema for editors, generated from the table of keys in dnsproxy/config_schema.py.
schema: $(STAMP)
	$(BIN)/python -c 'import sys; from dnsproxy.config_schema import schema_text; \
	sys.stdout.write(schema_text())' > config/dnsproxy.schema.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build

# Container image (deploy/Dockerfile). The wheels are built here, on the host, for the
# image's Python (3.11, glibc; binary wheels only), and installed in the image with
# --no-index: the build needs no package index and does the same every time.
IMAGE ?= localhost/dnsproxy:latest
# Debian bookworm has glibc 2.36: any manylinux wheel up to that runs there.
ARCH := $(shell uname -m)
WHEEL_PLATFORMS ?= $(foreach v,36 34 31 28 17,--platform manylinux_2_$(v)_$(ARCH)) \
	--platform manylinux2014_$(ARCH)
wheels: $(STAMP)
	rm -rf build/wheels
	$(BIN)/pip wheel --quiet --no-deps -w build/wheels .
	$(BIN)/pip download --quiet --only-binary=:all: --python-version 3.11 \
		--implementation cp $(WHEEL_PLATFORMS) -d build/wheels build/wheels/dnsproxy-*.whl

image: wheels
	deploy/build-image.sh $(IMAGE)

# Benchmarks (see benchmarks/README.md), never part of `make test`; CI runs bench-smoke.
.PHONY: bench bench-smoke
bench: $(STAMP)
	$(BIN)/pip install --quiet matplotlib
	$(BIN)/python -m benchmarks

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks --smoke
