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

test: $(BIN)/.installed
	$(BIN)/python -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
