# Two entry points: `make demo` (set up, then the PETS quick demo) and `make test`; also
# `make docs` (the documentation site, build/site/) and `make wheel-smoke` (the wheel, installed
# outside the clone, running the README's commands).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MUJOCO_GL ?= egl

.PHONY: setup demo test lint bench docs wheel-smoke

$(BIN)/mbrl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# the distribution was called mbrl before it became torch-mbrl: drop an old editable install
	$(BIN)/python -m pip uninstall --quiet --yes mbrl 2>/dev/null || true
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

$(BIN)/mkdocs: $(BIN)/mbrl
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(BIN)/mkdocs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

wheel-smoke: setup
	.ci/wheel_smoke $(BIN)/python
