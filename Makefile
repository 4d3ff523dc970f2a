# `make run`: set up .venv and run the main job; `make test`: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every dependency installs at the version in constraints.txt, the set the tests passed with, so that a
# release upstream cannot change what a fresh `make test` runs. TORCH picks another torch (TORCH=torch==2.14.1,
# or a build from PyTorch's index: TORCH="torch --index-url https://download.pytorch.org/whl/cu128"); it
# brings the Triton it requires, so the torch and triton pins are lifted then.
CONSTRAINTS := constraints.txt
TORCH_PIN := $(shell grep '^torch==' $(CONSTRAINTS))
TORCH ?= $(TORCH_PIN)
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
	$(PYTHON) -m venv $(VENV)
	$(call pins_without,$(VENV)/constraints.txt,$(LIFTED))
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt $(TORCH)
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt setuptools
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt --no-build-isolation -e ".[test,bench]"
	touch $@

# The main job: the tiny preset, character-level, on the embedded corpus; a few minutes on a CPU.
run: setup
	$(VENV)/bin/gptfast train --out-dir out/main --overwrite --max-steps 600 --lr 2e-3

# The tests. The ahead-of-time compiles (tests/test_aot_*.py: every configuration the launchers can
# choose, minutes) run in `make aot36`, with Triton 3.6; `make aot` runs them with this venv's.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The same suite against the newest release of every dependency, in a venv of its own (not in CI): to
# find upstream breaks on purpose. TORCH_LATEST picks the torch (default: the newest pip finds).
# `make lock` then writes that venv's versions into constraints.txt.
VENV_LATEST := build/venv-latest
TORCH_LATEST ?= torch

test-latest:
	rm -rf $(VENV_LATEST)
	$(PYTHON) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install --quiet --upgrade $(TORCH_LATEST)
	$(VENV_LATEST)/bin/python -m pip install --quiet --upgrade setuptools
	$(VENV_LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager --no-build-isolation \
		-e ".[test,bench]"
	$(VENV_LATEST)/bin/python -m pip list --format=freeze | grep -i -e '^torch==' -e '^triton==' -e '^transformers==' -e '^kernels=='
	$(VENV_LATEST)/bin/python -m pytest $(PYTEST_ARGS)

lock:
	@test -x $(VENV_LATEST)/bin/python || { echo "make lock: run make test-latest first" >&2; exit 2; }
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
	$(VENV36)/bin/python -m pip install --quiet -c $(VENV36)/constraints.txt $(TORCH)
	$(VENV36)/bin/python -m pip install --quiet -c $(VENV36)/constraints.txt "triton==3.6.0" setuptools \
		pytest hypothesis numpy tiktoken tqdm
	$(VENV36)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
