# Two commands for a newcomer: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint format install clean

$(BIN)/modelscope-router: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/modelscope-router

demo: install
	$(BIN)/modelscope-router demo

lint: install
	$(BIN)/ruff format --check router tests bench dashboards
	$(BIN)/ruff check router tests bench dashboards
	$(BIN)/mypy router

test: lint
	$(BIN)/pytest -q -p no:cacheprovider

format: install
	$(BIN)/ruff format router tests bench dashboards
	$(BIN)/ruff check --fix router tests bench dashboards

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
