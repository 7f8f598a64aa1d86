# slimforge: the two set-up commands of the README.
#   make run    install everything into .venv, then run the default recipe
#   make test   install everything into .venv, then run the test suite
# Extra arguments for the recipe: make run ARGS="stages.student.num_layers=16"

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the CPU wheel where one is provided locally; on a CUDA
# machine the same pin pulls PyPI's CUDA build. Override with TORCH=... .
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/slimforge run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) dist build *.egg-info
