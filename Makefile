# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, run a real ProRL run on the built-in task (CPU)
#   make test   same environment, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
STAMP_DEV := $(VENV)/.installed-dev
# CPU environment: pin torch (an unpinned torch pulls a multi-GB CUDA build) and megatron-core
# (0.17+ needs Python 3.12).
CPU_PINS := torch==2.13.0 megatron-core==0.16.1

.PHONY: demo test install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): setup.py | $(PY)
	$(PIP) install -q $(CPU_PINS)
	$(PIP) install -q -e ".[rewards]"
	touch $@

$(STAMP_DEV): $(STAMP)
	$(PIP) install -q -e ".[rewards,dev]"
	touch $@

install: $(STAMP)
install-dev: $(STAMP_DEV)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m megaprorl.cli train examples/demo.yaml

test: $(STAMP_DEV)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
