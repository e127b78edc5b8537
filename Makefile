# The two commands of the README: `make demo` runs the main job, `make test` runs every check.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP_T := $(VENV)/.installed-dev
STAMP_D := $(VENV)/.installed-demo
export PYTHONHASHSEED := 0
# one OpenMP thread: tests, demo and benchmarks use tiny tensors, where a second thread that the
# scheduler deschedules stalls every parallel region (measured 10-100x slowdowns on 2-core CI)
export OMP_NUM_THREADS ?= 1

.PHONY: demo test lint typecheck pytest docs bench bench-run clean venv device-check \
	device-check-cpu device-wheels

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_D): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(STAMP_T): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,demo]'
	touch $@ $(STAMP_D)

venv: $(STAMP_T)

demo: $(STAMP_D)
	$(BIN)/python -m robustft.demo

lint: $(STAMP_T)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP_T)
	$(BIN)/mypy robustft

pytest: $(STAMP_T)
	CI=$${CI:-1} $(BIN)/python -m pytest -q -p no:randomly tests robustft

docs: $(STAMP_T)
	rm -rf docs/_build
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html

# Smoke run of every benchmark kernel (one call each, no timing): part of `make test`.
bench: $(STAMP_T)
	$(BIN)/python -m pytest -q benchmarks/bench_*.py --benchmark-disable

# Real timings with the baselines in the same run; prints the ratios.
bench-run: $(STAMP_T)
	$(BIN)/python -m pytest -q benchmarks/bench_*.py --benchmark-only --benchmark-columns=min,median,mean,rounds

# The device check (docs/development.md, "Device check"): the tests marked `device` and the GPU
# ratios in one bounded run (<= 5 minutes), a JSON and a markdown table under OUT. On a GPU
# machine, from a fresh copy of the tree: `make device-check OUT=$OUT`. It needs no install and no
# network: it uses .venv if there is one, else the machine's python3 with this tree on PYTHONPATH,
# and installs the wheels in WHEELS (open_clip and its two small dependencies, which the GPU image
# lacks; `make device-wheels` fetches them here) into DEVICE_SITE first. DEVICE_ARGS go to the
# script (e.g. DEVICE_ARGS="--skip device_tests" to redo only the timings).
DEVICE_PY   ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
OUT         ?= /tmp/robustft-device-check
WHEELS      ?= .whl
DEVICE_SITE ?= /tmp/robustft-device-site
DEVICE_ARGS ?=

device-check:
	@if ls $(WHEELS)/*.whl >/dev/null 2>&1; then \
	  echo "installing $(WHEELS)/*.whl into $(DEVICE_SITE)"; \
	  $(DEVICE_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	    --target $(DEVICE_SITE) $(WHEELS)/*.whl || exit 1; \
	fi
	PYTHONUNBUFFERED=1 PYTHONPATH=$(CURDIR):$(DEVICE_SITE)$${PYTHONPATH:+:$$PYTHONPATH} \
	  $(DEVICE_PY) benchmarks/device_check.py --out $(OUT) $(DEVICE_ARGS)

# The same script on the CPU at tiny sizes (seconds; the device tests skip themselves): part of
# `make test`, so the check cannot rot. Prints the table, or the whole log if it fails.
device-check-cpu: $(STAMP_T)
	@out=$$(mktemp -d); \
	PYTHONPATH=$(CURDIR) $(BIN)/python benchmarks/device_check.py --cpu --out $$out >$$out/log 2>&1; \
	rc=$$?; if [ $$rc -eq 0 ]; then cat $$out/device_check.md; else cat $$out/log; fi; \
	rm -rf $$out; exit $$rc

# Here, with network: the wheels `make device-check` installs on a GPU machine (2.4 MB, the
# versions of this .venv). Carry the folder with the tree (the device tool's carry: [".whl"]).
device-wheels: $(STAMP_T)
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux2014_x86_64 -d $(WHEELS) \
	  $$($(BIN)/python -c "from importlib.metadata import version as v; \
	    print(*(f'{p}=={v(p)}' for p in ('open_clip_torch', 'ftfy', 'wcwidth')))")

test: lint typecheck pytest docs bench device-check-cpu

clean:
	rm -rf docs/_build .mypy_cache .ruff_cache .pytest_cache .hypothesis
