# Quick start:  make demo   |   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt pyproject.toml | cksum | cut -d' ' -f1)
export PATH := $(abspath $(VENV))/bin:$(PATH)
# the demo and the suite run on CPU processes (gloo), also on a GPU host; make gpu-check uses the GPU
export DS_ACCELERATOR ?= cpu

.PHONY: venv demo test test-fast clean

# (re)create the project venv whenever the requirements or pyproject.toml change; ppllm, models
# and data are installed editable, so scripts, tests and benchmarks import them from this checkout
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	bash scripts/demo.sh

# scripts/system_deps.sh: pdsh + openssh-server for the multi-node test when they are missing and
# installable (root with apt); otherwise it says why and that test is skipped with the reason
test: venv
	bash scripts/system_deps.sh
	$(PY) -m pytest tests

# parity, conversion, data and config checks in one process, no DeepSpeed launch (under 2 minutes)
test-fast: venv
	$(PY) -m pytest tests -m "not multiprocess"

clean:
	rm -rf demo_out runs .pytest_cache
