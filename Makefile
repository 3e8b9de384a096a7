# Two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_run

.PHONY: install demo test lint bench clean

install: $(STAMP)

# pip (not uv/poetry): on this project's machines pip takes the torch/torchvision pair from local files.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/endodistill demo --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -q

# Style, types and layering; configured in pyproject.toml ([tool.ruff], [tool.mypy], [tool.importlinter]).
lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
