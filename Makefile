# Two entry points for a fresh machine: `make test` and `make demo`. Both create .venv and install histo.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[cpu,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python scripts/demo.py --out demo_out

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache .ruff_cache
