# Two entry points for a fresh machine: `make test` and `make demo`. Both create .venv and install histo.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Lane 2: its own venv with PyPI's standard torch + torchvision builds (CUDA wheels; they run on CPU), because
# PyPI's torchvision does not load beside the CPU torch wheel of lane 1 and timm needs torchvision. The pair is
# pinned: no local CPU wheel of 2.12 exists to be preferred, and tiatoolbox accepts only torch < 2.13.
FULL_VENV := .venv-full
FULL_BIN := $(FULL_VENV)/bin
FULL_STAMP := $(FULL_VENV)/.installed
FULL_TORCH := torch==2.12.1 torchvision==0.27.1

.PHONY: install install-full test test-full demo lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[cpu,dev]"
	touch $(STAMP)

$(FULL_STAMP): pyproject.toml
	$(PY) -m venv $(FULL_VENV)
	$(FULL_BIN)/pip install --quiet --upgrade pip
	$(FULL_BIN)/pip install --quiet $(FULL_TORCH) -e ".[cpu,full,dev]"
	$(FULL_BIN)/python -c "import torchvision.ops, timm"
	touch $(FULL_STAMP)

install: $(STAMP)

install-full: $(FULL_STAMP)

# Lane 1: the core deps + cpu,dev; the tests needing lane-2 packages are deselected by their marker.
test: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not full"

# Lane 2: only the tests marked `full`.
test-full: $(FULL_STAMP)
	$(FULL_BIN)/python -m pytest tests -q -m full

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python scripts/demo.py --out demo_out

clean:
	rm -rf $(VENV) $(FULL_VENV) demo_out bench_out .pytest_cache .ruff_cache
