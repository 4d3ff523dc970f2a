# `make run`: set up .venv and run the main job; `make test`: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 lies on local disk here; elsewhere pip downloads it.
TORCH ?= torch==2.13.0

.PHONY: setup run test lint aot aot36 clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

# The main job: the tiny preset, character-level, on the embedded corpus; a few minutes on a CPU.
run: setup
	$(VENV)/bin/gptfast train --out-dir out/main --overwrite --max-steps 600 --lr 2e-3

# The tests, and the benchmark suite once at its small CPU sizes (--benchmark) so CI keeps it working,
# spread over the CPU cores (pytest-xdist; a file's tests stay together, sharing its fixtures). The
# ahead-of-time compiles (tests/test_aot_*.py: every configuration the launchers can choose, minutes)
# run in `make aot36`, with the GPU image's Triton; `make aot` runs them with this venv's.
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile tests --benchmark $(addprefix --ignore=,$(wildcard tests/test_aot_*.py))

# The linter, with the settings in ruff.toml.
lint: setup
	$(VENV)/bin/ruff check .

# The ahead-of-time tests (the kernel lab's inspect, spills, access widths, the main-loop baseline) again
# with Triton 3.6, the GPU image's version: its sm_90 code is what a lent GPU runs. Its interpreter
# cannot run our kernels, so those tests skip themselves there. The venv lives under build/.
VENV36 := build/venv36
AOT_TESTS := tests/test_lab.py $(wildcard tests/test_aot_*.py)

aot: setup
	$(PY) -m pytest -q $(AOT_TESTS)

aot36: $(VENV36)/.installed
	$(VENV36)/bin/python -m pytest -q $(AOT_TESTS)

$(VENV36)/.installed: setup.py
	$(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install --quiet "$(TORCH)" "triton==3.6.0" pytest hypothesis numpy tiktoken tqdm
	$(VENV36)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
