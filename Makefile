# Two entry points for a fresh machine: `make test` and `make demo`. Both create .venv and install histo.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser test test-brats .venv-brats demo lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[cpu,dev,serve]"
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium and its driver for the browser tests of `histo serve` (Debian packages), installed only
# when missing; elsewhere install chromium and chromedriver with your package manager.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "install chromium and chromedriver (browser tests)"; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

test: $(STAMP) browser
	$(BIN)/python -m pytest tests -q -m "not full"

# The official BraTS scorer (brats-evaluation 0.0.10 on panoptica, which pins numpy < 2.3) in its own venv:
# the oracle that the `full`-marked agreement test and scripts/bench_brats_eval.py run in a subprocess.
BRATS_VENV := .venv-brats
BRATS_STAMP := $(BRATS_VENV)/.installed

$(BRATS_STAMP):
	$(PY) -m venv $(BRATS_VENV)
	$(BRATS_VENV)/bin/pip install --quiet --upgrade pip
	$(BRATS_VENV)/bin/pip install --quiet "brats-evaluation==0.0.10"
	touch $(BRATS_STAMP)

.venv-brats: $(BRATS_STAMP)

test-brats: $(STAMP) $(BRATS_STAMP)
	$(BIN)/python -m pytest tests/test_seg_official.py -q -m full

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python scripts/demo.py --out demo_out

clean:
	rm -rf $(VENV) $(BRATS_VENV) demo_out bench_out .pytest_cache .ruff_cache
