# Two entry points: `make demo` (set up, then the PETS quick demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MUJOCO_GL ?= egl

.PHONY: setup demo test lint bench

$(BIN)/mbrl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/mbrl

demo: setup
	rm -rf runs/pets-demo
	$(BIN)/mbrl run pets --env cartpole-balance --name pets-demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python experiments/bench_planning.py
