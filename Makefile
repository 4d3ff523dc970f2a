# `make run`: set up .venv and run the main job; `make test`: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 lies on local disk here; elsewhere pip downloads it.
TORCH ?= torch==2.13.0

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

# The main job: the tiny preset, character-level, on the embedded corpus; a few minutes on a CPU.
run: setup
	$(VENV)/bin/gptfast train --out-dir out/main --overwrite --max-steps 600 --lr 2e-3

# The tests, and the benchmark suite once at its small CPU sizes (--benchmark) so CI keeps it working.
test: setup
	$(PY) -m pytest -q tests --benchmark

clean:
	rm -rf $(VENV) build *.egg-info
