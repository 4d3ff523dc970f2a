# `make run`: set up .venv and run the main job; `make test`: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every dependency installs at the version in constraints.txt, the set the tests passed with, so that a
# release upstream cannot change what a fresh `make test` runs; the set needs Python 3.11 or newer.
# For a new venv (after `make clean`), TORCH picks another torch (TORCH=torch==2.14.1) and TORCH_INDEX an
# index to find it in besides PyPI (TORCH_INDEX=https://download.pytorch.org/whl/cpu). Another torch
# brings the Triton it requires, so the torch and triton pins are lifted then.
CONSTRAINTS := constraints.txt
TORCH_PIN := $(shell grep '^torch==' $(CONSTRAINTS))
TORCH ?= $(TORCH_PIN)
TORCH_INDEX ?=
torch_from = "$(1)" $(if $(TORCH_INDEX),--extra-index-url "$(TORCH_INDEX)")
LIFTED := torch $(if $(filter $(TORCH_PIN),$(TORCH)),,triton)
# The constraints without the pins of the packages named in $(2), into $(1).
pins_without = grep -v $(foreach name,$(2),-e '^$(name)==') $(CONSTRAINTS) > $(1)
# The suite, spread over the CPU cores (pytest-xdist; a file's tests stay together, sharing its fixtures),
# with the benchmark suite once at its small CPU sizes (--benchmark) so that it keeps working.
PYTEST_ARGS = -q -n auto --dist loadfile tests --benchmark $(addprefix --ignore=,$(wildcard tests/test_aot_*.py))

.PHONY: setup run test test-latest lock lint aot aot36 clean

setup: $(VENV)/.installed

# The package installs in place (editable, from src/) with the venv's own pinned setuptools.
$(VENV)/.installed: setup.py $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "make: the versions in $(CONSTRAINTS) need \
	Python 3.11 or newer; choose one with PYTHON=python3.11 (pip install . takes 3.10 too)")'
	$(PYTHON) -m venv $(VENV)
	$(call pins_without,$(VENV)/constraints.txt,$(LIFTED))
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt $(call torch_from,$(TORCH))
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt setuptools
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt --no-build-isolation -e ".[test,bench,data]"
	touch $@

# The main job: the tiny preset, character-level, on the embedded corpus; a few minutes on a CPU.
run: setup
	$(VENV)/bin/gptfast train --out-dir out/main --overwrite --max-steps 600 --lr 2e-3

# The tests. The ahead-of-time compiles (tests/test_aot_*.py: every configuration the launchers can
# choose, minutes) run in `make aot36`, with Triton 3.6; `make aot` runs them with this venv's.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The same suite against the newest release of every dependency, in a venv of its own (not in CI): to
# find upstream breaks on purpose. TORCH_LATEST picks the torch (default: the newest on PyPI, whose Linux
# wheels are CUDA builds and pin the Triton they need). `make lock` then writes that venv's versions into
# constraints.txt, once the suite has passed there.
VENV_LATEST := build/venv-latest
TORCH_LATEST ?= torch

test-latest:
	rm -rf $(VENV_LATEST)
	$(PYTHON) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install --quiet --upgrade setuptools
	$(VENV_LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager --no-build-isolation \
		$(call torch_from,$(TORCH_LATEST)) -e ".[test,bench,data]"
	$(VENV_LATEST)/bin/python -m pip list --format=freeze | grep -i -e '^torch=' -e '^triton=' -e '^transformers=' -e '^kernels='
	$(VENV_LATEST)/bin/python -m pytest $(PYTEST_ARGS)
	touch $(VENV_LATEST)/.passed

# The triton pin must be the one torch's own wheels require: a CPU build of torch requires none.
lock:
	@test -e $(VENV_LATEST)/.passed || { echo "make lock: make test-latest has not passed in $(VENV_LATEST)" >&2; exit 2; }
	@$(VENV_LATEST)/bin/python -c 'import importlib.metadata as m, sys; sys.exit(not any(r.startswith("triton") \
	for r in m.requires("torch") or []) and "make lock: the torch in $(VENV_LATEST) requires no Triton (a CPU \
	build), so its triton would not be the one the CUDA build pins: run make test-latest with a CUDA build")'
	{ sed -n '/^#/p' $(CONSTRAINTS); $(VENV_LATEST)/bin/python -m pip freeze --all --exclude-editable \
		| grep -v -e '^#' -e '^pip==' | sed 's/+[a-z0-9.]*$$//'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

# The linter, with the settings in ruff.toml.
lint: setup
	$(VENV)/bin/ruff check .

# The ahead-of-time tests (the kernel lab's inspect, spills, access widths, the main-loop baseline) again
# with Triton 3.6, the version of the GPU image the benchmark run targets: its sm_90 code is what that
# GPU runs. Its interpreter cannot run our kernels, so those tests skip themselves there. The venv lives
# under build/, pinned like .venv but for Triton.
VENV36 := build/venv36
AOT_TESTS := tests/test_lab.py $(wildcard tests/test_aot_*.py)

aot: setup
	$(PY) -m pytest -q $(AOT_TESTS)

aot36: $(VENV36)/.installed
	$(VENV36)/bin/python -m pytest -q $(AOT_TESTS)

$(VENV36)/.installed: setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV36)
	$(call pins_without,$(VENV36)/constraints.txt,torch triton)
	$(VENV36)/bin/python -m pip install --quiet -c $(VENV36)/constraints.txt $(call torch_from,$(TORCH))
	$(VENV36)/bin/python -m pip install --quiet -c $(VENV36)/constraints.txt "triton==3.6.0" setuptools \
		pytest hypothesis numpy tiktoken tqdm
	$(VENV36)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
