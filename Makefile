# The two set-up commands of the README:
#   make serve   # starts the OpenAI-compatible server (a tiny random-weight demo model unless MODEL=... is given)
#   make test    # lint, import-direction check and the whole CPU test suite
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

# llama-models ships the real Llama 3 tokenizer file (the demo model and the tests use it), but its wheel also
# holds a top-level package named `models` that would shadow ours: it goes to a folder outside the import path.
$(VENV)/llama-models/.installed: requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --no-deps -c requirements/constraints.txt --target $(VENV)/llama-models llama-models
	touch $@

$(VENV)/.installed-runtime: pyproject.toml requirements/constraints.txt $(VENV)/llama-models/.installed
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml requirements/constraints.txt $(VENV)/llama-models/.installed
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e ".[test]"
	touch $@ $(VENV)/.installed-runtime

serve: $(VENV)/.installed-runtime
	$(BIN)/plm-serve $(if $(MODEL),--model $(MODEL)) $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q $(ARGS)
