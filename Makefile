# Two entry points: `make demo` and `make test`. Each sets up .venv first if needed.
# A torch that is already importable (e.g. your CUDA build) is kept; otherwise torch 2.13.0 is installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup lint clean

demo: $(STAMP)
	$(BIN)/staterank demo

test: $(STAMP)
	$(BIN)/python -m pytest

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[fla,dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
