# One virtual environment per checkout (.venv); every target sets it up when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/pytest

# Everything, including the tests marked slow.
test-all: $(STAMP)
	$(BIN)/pytest -m ""

demo: $(STAMP)
	$(BIN)/jointssl fit --config configs/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check jointssl tests benchmarks

clean:
	rm -rf $(VENV) demo_data runs lightning_logs
