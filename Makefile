# Everything a fresh machine needs comes from these targets: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKED := $(wildcard llmtrace tests benchmarks alembic)

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev,reports]'
	touch $(STAMP)

demo: install
	$(BIN)/llmtrace migrate
	$(BIN)/llmtrace demo
	$(BIN)/llmtrace usage --all-organizations --since 1d --by model --chart .llmtrace/usage-by-model.png

test: lint
	$(BIN)/pytest -n 2 -q --durations=15

lint: install
	$(BIN)/ruff check $(CHECKED)
	$(BIN)/ruff format --check $(CHECKED)
	$(BIN)/mypy llmtrace

format: install
	$(BIN)/ruff check --fix $(CHECKED)
	$(BIN)/ruff format $(CHECKED)

bench: install
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/backfill.py
	$(BIN)/python benchmarks/reads.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/writer.py
	$(BIN)/python benchmarks/storage.py
	$(BIN)/python benchmarks/rollup.py

clean:
	rm -rf $(VENV) .llmtrace .pytest_cache .mypy_cache .ruff_cache .hypothesis
