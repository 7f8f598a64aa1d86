# slimforge: the two set-up commands of the README.
#   make run    install everything into .venv, then run the default recipe
#   make test   install everything into .venv, then run the test suite
#   make test-slow  the slow tier (real teacher), the runtime checks (vLLM, llama.cpp) and the browser
#                   test; installs Chromium, vLLM and llama.cpp's tools where missing
# Extra arguments for the recipe: make run ARGS="stages.student.num_layers=16"

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the CPU wheel where one is provided locally; on a CUDA
# machine the same pin pulls PyPI's CUDA build. Override with TORCH=... .
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow browser runtimes lint clean

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

test-slow: $(STAMP) browser runtimes
	$(BIN)/python -m pytest -q -m "(slow or browser or runtime) and not avx512" $(ARGS)

# vLLM's CPU build (own venv) and llama.cpp's tools (built from pinned source), in the slimforge cache.
runtimes: $(STAMP)
	$(BIN)/slimforge runtime install all

# The browser test opens the HTML report in headless Chromium (tests/test_eval_runner.py).
# sudo only where we are not root; env carries DEBIAN_FRONTEND past sudo's reset environment.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) dist build *.egg-info
