# DeColla: `make demo` and `make test` work on a fresh machine (they set everything up).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Debian packages the tests use when present (network namespaces, tc, headless browser).
SYSDEPS := iproute2 chromium chromium-driver

.PHONY: all setup sysdeps build demo test test-fast test-arm bench clean

all: test

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (DeColla needs Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Runtime + dev + train + gateway + bench extras; torch pinned to the local CPU build (never let pip choose a newer one).
$(STAMP): $(VENV)/bin/python pyproject.toml setup.py $(wildcard kernels/*.pyx kernels/*.pxi kernels/*.h)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "Cython>=3.0" "numpy>=1.26" "scipy>=1.11" "torch==2.13.0"
	$(PIP) install -q --no-build-isolation -e ".[dev,train,gateway,bench]"
	touch $(STAMP)

setup: $(STAMP)

build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# Best effort: installs the Debian packages some tests need; those tests skip with a reason without them.
sysdeps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "warning: could not install$$missing; the tests needing them will skip"; fi; \
	else echo "sysdeps: not root or no apt-get; tests needing$(SYSDEPS) may skip"; fi

demo: setup
	$(VENV)/bin/decolla demo

test: setup sysdeps
	$(PY) -m pytest -q -rs

test-fast: setup
	$(PY) -m pytest -q -m "not integration and not testbed and not slow"

# The kernel, fused, forward and wire tests and `decolla demo` on an emulated Cortex-A72
# (Debian arm64 chroot under qemu-user, cached in /var/cache/decolla-arm; root only).
test-arm:
	tools/test-arm.sh

bench: setup
	$(PY) -m bench.kernels
	$(PY) -m bench.models
	$(PY) -m bench.runtime
	$(PY) -m bench.policy --quick

clean:
	rm -rf build $(VENV) *.egg-info decolla/kernels/*.so kernels/*.c .pytest_cache .hypothesis
