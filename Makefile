# Quick start:  make demo   |   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DS_ACCELERATOR ?= $(shell python3 -c "import shutil;print('' if shutil.which('nvidia-smi') else 'cpu')")

.PHONY: venv demo test clean

# (re)create the project venv whenever requirements.txt changes
$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
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

clean:
	rm -rf demo_out runs .pytest_cache
