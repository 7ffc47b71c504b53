# The two set-up commands of the README:
#   make serve   # starts the OpenAI-compatible server (a tiny random-weight demo model unless MODEL=... is given)
#   make test    # lint, import-direction check, type check and the whole CPU test suite
# Both create .venv on first use and install the pinned versions of requirements/constraints.txt.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
MODEL ?=

.PHONY: serve test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-runtime: pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e ".[test]"
	touch $@ $(VENV)/.installed-runtime

serve: $(VENV)/.installed-runtime
	$(BIN)/plm-serve $(if $(MODEL),--model $(MODEL)) $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python tools/typecheck.py

test: lint
	$(BIN)/python -m pytest -q $(ARGS)
