# make train: set up .venv and train the default config; make test: set up .venv and run tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: train test clean-venv

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

train: $(BIN)/.installed
	$(BIN)/python train.py $(ARGS)

# one worker per core; each test file stays on one worker, so its module fixtures (the
# reference runs) are built once; files go out longest first (tests/conftest.py)
test: $(BIN)/.installed
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder $(ARGS)

clean-venv:
	rm -rf $(VENV)
