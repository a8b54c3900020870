# Two commands do all set-up: `make lab` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LAB_PORT ?= 8888
# --ServerApp.allow_root lets the server start when the user is root (containers, CI)
LAB_FLAGS = --no-browser --ip=127.0.0.1 --port=$(LAB_PORT) --ServerApp.root_dir=notebooks --ServerApp.allow_root=True
NBVAL = --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: install lab test lint lab-smoke chromium clean gpu-wheels gpu-check

# torch==2.13.0 goes in first: it is the CPU build here, so the kit's `torch>=2.3`
# is already satisfied and pip pulls no CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lab: install
	$(VENV)/bin/jupyter lab $(LAB_FLAGS)

lint: install
	$(VENV)/bin/ruff check .

test: lint
	ADAPTIVE_KIT_FAST=1 $(VENV)/bin/pytest --durations=15 tests notebooks $(NBVAL)

# Debian's chromium for the browser tests (tests/browser): apt, as root or through sudo. One line
# on success; apt's output goes to a log that is shown only when the install fails.
CHROMIUM_LOG ?= /tmp/adaptive-kit-chromium.log
APT = env DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o Dpkg::Use-Pty=0
chromium:
	@if [ -x /usr/bin/chromium ]; then echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null)"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	{ $$SUDO $(APT) install chromium || { $$SUDO $(APT) update && $$SUDO $(APT) install chromium; }; } \
		>$(CHROMIUM_LOG) 2>&1 || { cat $(CHROMIUM_LOG); echo "make chromium: apt failed (log above)"; exit 1; }; \
	echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null) installed"

# Start JupyterLab exactly as `make lab` does, check that it answers over HTTP, stop it.
lab-smoke: install
	$(PY) .ci/lab_smoke.py $(VENV)/bin/jupyter lab $(LAB_FLAGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info

# GPU machines (.ci/gpu_check.py): `make gpu-wheels` where a package index is reachable, then on
# a GPU machine whose python3 already holds a CUDA torch and reaches no index, `make gpu-check`.
# CI runs the same check on the CPU: `make gpu-check GPU_DEVICE=cpu` (the venv's python, small sizes).
GPU_WHEELS ?= .gpu-wheels
GPU_DEVICE ?= cuda
GPU_PY ?= $(if $(filter cpu,$(GPU_DEVICE)),$(PY),python3)
# the kit's requirements but torch, for CPython 3.12 on manylinux x86-64, binary wheels only
gpu-wheels: install
	mkdir -p $(GPU_WHEELS)
	$(PY) .ci/gpu_check.py --requirements > $(GPU_WHEELS)/requirements.txt
	$(PY) -m pip download --quiet --dest $(GPU_WHEELS) --only-binary=:all: --implementation cp \
		--python-version 3.12 --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -r $(GPU_WHEELS)/requirements.txt

gpu-check:
	$(GPU_PY) .ci/gpu_check.py --device $(GPU_DEVICE) --wheels $(GPU_WHEELS) --json benchmarks/out/gpu_check.json
