# One virtual environment per checkout (.venv); every target sets it up when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo lint clean lock

install: $(STAMP)

# The versions tested together (constraints.txt) unless CONSTRAINTS= is given empty; EXTRAS=dev,benchmarks adds
# the benchmarks' own dependencies, EXTRAS= installs the core only (make demo needs nothing more).
CONSTRAINTS ?= constraints.txt
EXTRAS ?= dev
PIP_CONSTRAINT_ARGS := $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS))

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_CONSTRAINT_ARGS) --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_CONSTRAINT_ARGS) -e ".$(if $(EXTRAS),[$(EXTRAS)])"
	touch $(STAMP)

# Upgrade the pins: resolve every dependency afresh (newest versions pyproject.toml allows) in a scratch venv, then
# write them to constraints.txt. Review the diff, run make test with the new pins, commit both.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -e ".[dev,benchmarks]"
	{ echo "# The dependency versions jointssl is tested with; make install applies them (pip --constraint)."; \
	  echo "# Regenerate with make lock (newest versions pyproject.toml allows), then make test."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	rm -rf .venv-lock

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
	rm -rf $(VENV) .venv-lock demo_data runs lightning_logs
