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

.PHONY: run test lint typecheck unit venv clean schema wheels image compiled pure

# DNSPROXY_MYPYC=1 on a target (`make run DNSPROXY_MYPYC=1`, `make unit DNSPROXY_MYPYC=1`):
# the query-path modules (dnsproxy.NATIVE_MODULES) compiled with mypyc, built in place next
# to their sources (dnsproxy/*.so, which Python imports before the .py) and rebuilt when a
# source changed; needs gcc and Python's headers (Debian: python3-dev). Without it, every
# target runs the pure-Python modules and removes compiled ones left in place, so that
# what runs is always what the sources say. `make compiled` only builds them; `make test`
# runs both builds whatever it says.
DNSPROXY_MYPYC ?= 0
EXT_SUFFIX := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
NATIVE := dnsproxy/_native__mypyc$(EXT_SUFFIX)
ifeq ($(filter 1 true yes,$(DNSPROXY_MYPYC)),)
BUILD := pure
else
BUILD := $(NATIVE)
endif

# dnsproxy/__init__.py holds the version, which the installed metadata records.
$(STAMP): pyproject.toml dnsproxy/__init__.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	DNSPROXY_MYPYC=0 $(BIN)/pip install --quiet -e '.[test]'  # the compiled build: $(NATIVE)
	touch $(STAMP)

venv: $(STAMP)

# An editable install that builds the extensions in place (--no-build-isolation: mypy and
# the runtime dependencies, whose types mypyc checks against, are in .venv already). A
# copy is kept in build/compiled, so that switching builds (`make test` runs both) does
# not compile again (about 40 s) until a source changes.
COMPILED := build/compiled
$(COMPILED)/.built: $(STAMP) setup.py build_support/backend.py $(wildcard dnsproxy/*.py dnsproxy/*.c)
	mkdir -p build
	DNSPROXY_MYPYC=1 $(BIN)/pip install --quiet --no-deps --no-build-isolation -e . \
		> build/mypyc.log 2>&1 || { tail -40 build/mypyc.log; exit 1; }
	rm -rf $(COMPILED) && mkdir -p $(COMPILED) && cp dnsproxy/*.so $(COMPILED)/
	touch $@

$(NATIVE): $(COMPILED)/.built
	cp --remove-destination $(COMPILED)/*.so dnsproxy/  # new files: a running process keeps its own

compiled: $(NATIVE)

pure:
	rm -f dnsproxy/*.so

run: $(STAMP) $(BUILD)
	$(BIN)/dnsproxy --config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check dnsproxy tests benchmarks setup.py build_support
	$(BIN)/ruff format --check dnsproxy tests benchmarks setup.py build_support

typecheck: $(STAMP)
	$(BIN)/mypy

# TESTS: files or node ids to run (default: all). DNSPROXY_EXPECT_BUILD: a test checks that the modules imported are the build asked for.
unit: $(STAMP) $(BUILD)
	DNSPROXY_EXPECT_BUILD=$(if $(filter pure,$(BUILD)),no,mypyc) $(BIN)/pytest -q $(TESTS)

# The tests of the compiled modules and of whole servers in one process: where the two
# builds could differ (mypyc's semantics). The rest of the suite (processes, namespaces,
# the image, workers) runs the same modules with more plumbing around them.
BUILD_TESTS := tests/test_wire.py tests/test_cache.py tests/test_framing.py \
	tests/test_pipeline.py tests/test_resolution.py tests/test_upstream.py \
	tests/test_fastpath.py tests/test_e2e.py tests/test_truncate.py tests/test_tcp_clients.py \
	tests/test_tls.py tests/test_auto_transport.py tests/test_metrics.py tests/test_packaging.py \
	tests/test_udpio.py

# Both builds: BUILD_TESTS against pure Python (what `pip install` gives), then the whole
# suite against the compiled build (what the image ships; README, "Compiled build").
# Without a C compiler or Python's headers the whole suite runs against pure Python and
# the compiled build is skipped, saying why; under CI=true that is an error.
test: lint typecheck
	@set -e; reason=$$($(BIN)/python build_support/compiler.py) || true; \
	if [ -z "$$reason" ]; then \
		echo "make test: 1/2: the pure-Python build, tests of the query-path modules"; \
		$(MAKE) --no-print-directory unit DNSPROXY_MYPYC=0 TESTS="$(BUILD_TESTS)"; \
		echo "make test: 2/2: the compiled build (mypyc), the whole suite"; \
		$(MAKE) --no-print-directory unit DNSPROXY_MYPYC=1 TESTS=; \
	else \
		case "$${CI:-}" in 1|true|yes) \
			echo "make test: cannot make the compiled build under CI: $$reason" >&2; exit 2;; \
		esac; \
		echo "make test: SKIPPED the compiled build (mypyc): $$reason"; \
		echo "make test: the pure-Python build, the whole suite"; \
		$(MAKE) --no-print-directory unit DNSPROXY_MYPYC=0 TESTS=; \
	fi

# The JSON Schema for editors, generated from the table of keys in dnsproxy/config_schema.py.
schema: $(STAMP)
	$(BIN)/python -c 'import sys; from dnsproxy.config_schema import schema_text; \
	sys.stdout.write(schema_text())' > config/dnsproxy.schema.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dnsproxy/*.so

# Container image (deploy/Dockerfile). The wheels are built here, on the host, for the
# image's Python (3.11, glibc; binary wheels only), and installed in the image with
# --no-index: the build needs no package index and does the same every time. dnsproxy's
# own wheel is the compiled one (DNSPROXY_MYPYC=1), so the host's Python must be the
# image's: 3.11 (Debian bookworm's python3, which `make` picks), with gcc and python3-dev.
IMAGE ?= localhost/dnsproxy:latest
# Debian bookworm has glibc 2.36: any manylinux wheel up to that runs there.
ARCH := $(shell uname -m)
WHEEL_PLATFORMS ?= $(foreach v,36 34 31 28 17,--platform manylinux_2_$(v)_$(ARCH)) \
	--platform manylinux2014_$(ARCH) --platform linux_$(ARCH)
wheels: $(STAMP)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
		echo "make wheels: the image runs Python 3.11; .venv has another (make clean; make PYTHON=python3.11 wheels)" >&2; exit 2; }
	rm -rf build/wheels
	DNSPROXY_MYPYC=1 $(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w build/wheels .
	$(BIN)/pip download --quiet --only-binary=:all: --python-version 3.11 \
		--implementation cp $(WHEEL_PLATFORMS) -d build/wheels build/wheels/dnsproxy-*.whl

image: wheels
	deploy/build-image.sh $(IMAGE)

# Benchmarks (see benchmarks/README.md), never part of `make test`; CI runs bench-smoke.
.PHONY: bench bench-smoke
bench: $(STAMP) $(NATIVE)
	$(BIN)/pip install --quiet matplotlib
	$(BIN)/python -m benchmarks

bench-smoke: $(STAMP) $(BUILD)
	$(BIN)/python -m benchmarks --smoke
