# Two commands set everything up on a fresh clone: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test lint bench clean

$(STAMP): pyproject.toml requirements-ci.txt requirements-book.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements-ci.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-book.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)  # lint rules only (lines within 120 characters): the code is laid out by hand, not by ruff format
	$(BIN)/ruff check spamclf benchmarks tests train.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf logs outputs .pytest_cache
