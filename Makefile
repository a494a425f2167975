# One-command entry points. `make demo` and `make test` are the two a newcomer needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup setup-web test lint demo study clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-web.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# What tests/test_search_web.py needs besides the venv: Debian's Chromium (root: apt-get).
# Idempotent: nothing to do when `chromium` is on PATH. .ci/run calls it before `make test`.
setup-web: setup
	@if command -v chromium >/dev/null 2>&1; then echo "setup-web: $$(command -v chromium)"; \
	else apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && \
	  echo "setup-web: installed $$(command -v chromium)"; fi

test: setup
	$(BIN)/python -m pytest
	$(BIN)/ruff check .

lint: setup
	$(BIN)/ruff check .

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

# 3 seeds of the demo + the pre-training task ablation (scripts/study.py); <= 60 min on 2 cores
study: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python scripts/study.py --out study_output

clean:
	rm -rf $(VENV) demo_output study_output .pytest_cache .ruff_cache
