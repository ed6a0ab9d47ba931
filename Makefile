# matloop: `make demo` and `make test` set everything up on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := libxc-dev libopenblas-dev libfftw3-dev slurm-wlm munge
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# The suite runs its test files side by side, one worker per core up to four (pytest-xdist; each worker's
# torch uses one thread), so CI's 2 cores finish it in about half the serial time.
PYTEST_WORKERS ?= --numprocesses=auto --maxprocesses=4 --dist=loadfile
# Invoked as the full passes of 2026-12-07 ran (checkout on PYTHONPATH, unbuffered, no cache plugin); plain
# `.venv/bin/pytest` stalled at 424 of 434 twice, here and on CI, for a reason not yet found.
PYTEST := PYTHONPATH=$(CURDIR) $(BIN)/python -u -m pytest -p no:cacheprovider
# Threads and Prefect defaults are set by every matloop process itself (core/settings.py:apply_process_defaults).
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast lint serve benchmarks

install: $(VENV)/.gpaw

# Debian packages: libxc/OpenBLAS/FFTW for GPAW, slurm-wlm + munge for the HPC path's tests.
$(VENV)/.system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.system
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==25.3
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# GPAW from source against Debian's libraries (siteconfig in deployments/). Never set
# GPAW_BUILD_JOBS: the build then silently misses _gpaw.
$(VENV)/.gpaw: $(VENV)/.installed deployments/gpaw_siteconfig.py
	$(BIN)/python -c "import gpaw, _gpaw" 2>/dev/null || \
	  GPAW_CONFIG=$(CURDIR)/deployments/gpaw_siteconfig.py $(BIN)/pip install -q 'gpaw==26.7.0'
	$(BIN)/python -c "import gpaw, _gpaw; print('gpaw', gpaw.__version__)"
	touch $@

# One small active-learning iteration on the committed seed set (about 6 minutes on 2 cores).
demo: install
	$(BIN)/matloop demo

# The whole suite (what CI runs). pytest's exit code is kept in .pytest-exit for .ci/run.
test: install
	@$(PYTEST) $(PYTEST_WORKERS) $(PYTEST_ARGS); rc=$$?; echo $$rc > .pytest-exit; exit $$rc

# The fast subset while you work: no slow physics, DFT, SLURM or server tests.
test-fast: install
	$(PYTEST) $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

serve: install
	$(BIN)/matloop serve

benchmarks: install
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
