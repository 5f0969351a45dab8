# Two entry points: `make demo` and `make test`. Each sets up .venv first if needed, from the lock
# (constraints.txt: the versions the suite passed with). A torch that is already importable (e.g. your
# CUDA build) is kept; otherwise the locked torch (CPU build) is installed.
# `make test-latest` runs the suite against the newest releases instead, in .venv-latest.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := constraints.txt
LATEST := .venv-latest
# test-latest: packages to try on top, past pyproject's upper bounds, e.g. TRY='transformers==5.24.0'
TRY ?=

.PHONY: demo test test-latest setup lock lint clean

demo: $(STAMP)
	$(BIN)/staterank demo

test: $(STAMP)
	$(BIN)/python -m pytest

setup: $(STAMP)

# torch and triton come from the lock only where setup installs torch itself; an existing torch keeps its triton.
# pip unpacks and builds under $(PIPTMP), on the venv's own disk rather than a /tmp that may be small, and keeps
# no second copy of each wheel in its cache. A disk too full for the install is refused before pip starts.
PIPTMP := $(VENV)/.pip-tmp
PIP := TMPDIR=$(abspath $(PIPTMP)) PIP_NO_CACHE_DIR=1 $(BIN)/python -m pip
NEED_GIB_TORCH := 3.5
NEED_GIB := 1.5
DISK_CHECK = $(BIN)/python -c "import shutil, sys; need = float(sys.argv[1]); free = shutil.disk_usage('$(VENV)').free / 2**30; \
	free >= need or sys.exit(f'setup needs about {need:g} GiB free on the disk of $(VENV) and has {free:.1f} GiB: free some space and run it again')"
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	mkdir -p $(PIPTMP)
	if $(BIN)/python -c "import torch" 2>/dev/null; then \
		$(DISK_CHECK) $(NEED_GIB) && grep -vE '^(torch|triton)==' $(LOCK) > $(VENV)/constraints.txt; \
	else \
		$(DISK_CHECK) $(NEED_GIB_TORCH) && $(PIP) install $$(grep -E '^(torch|triton)==' $(LOCK)) && cp $(LOCK) $(VENV)/constraints.txt; \
	fi
	$(PIP) install -c $(VENV)/constraints.txt -e ".[fla,dev]"
	rm -rf $(PIPTMP)
	touch $(STAMP)

# The newest releases within pyproject's ranges (torch stays at the locked build: a newer one is a CUDA download).
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv --system-site-packages $(LATEST)
	grep -E '^torch==' $(LOCK) > $(LATEST)/torch.txt
	$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST)/bin/python -m pip install -c $(LATEST)/torch.txt torch
	$(LATEST)/bin/python -m pip install -c $(LATEST)/torch.txt --upgrade --upgrade-strategy eager -e ".[fla,dev]"
	test -z "$(TRY)" || $(LATEST)/bin/python -m pip install -c $(LATEST)/torch.txt --upgrade $(TRY)
	$(LATEST)/bin/python -m pip freeze --exclude-editable | grep -iE '^(transformers|flash-linear-attention|fla-core|peft|accelerate|tokenizers|triton|lm.eval)=='
	$(LATEST)/bin/python -m pytest

# Rewrite the lock: resolve the newest releases within pyproject's ranges in a clean environment (no system
# packages), keeping the locked torch. Run `make test` on the result before committing it.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	grep -E '^torch==' $(LOCK) > .venv-lock/torch.txt
	.venv-lock/bin/python -m pip install -c .venv-lock/torch.txt torch
	.venv-lock/bin/python -m pip install -c .venv-lock/torch.txt -e ".[fla,dev]" $(TRY)
	{ grep '^#' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/^\(torch==[^+]*\)+.*/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(LATEST) runs
