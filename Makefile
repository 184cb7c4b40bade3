# Two commands for a fresh machine: `make train` and `make test` (both create .venv and install first);
# `make docs` builds the documentation site into site/ (mkdocs build --strict, as CI does).
PYTHON ?= python3
# Test workers (pytest-xdist): each test file runs whole on one worker, so module fixtures are made once.
# Most tests wait on one-thread Python work (imports, tiny models), so two workers fill two cores.
TEST_WORKERS ?= 2
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test lint docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py +experiment=shapes

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) logs .pytest_cache site
