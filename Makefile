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

.PHONY: demo test lint typecheck pytest docs bench bench-run clean venv

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

test: lint typecheck pytest docs bench

clean:
	rm -rf docs/_build .mypy_cache .ruff_cache .pytest_cache .hypothesis
