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

.PHONY: install install-full browser openjpeg test test-full .venv-brats demo lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[cpu,dev,serve]"
	touch $(STAMP)

$(FULL_STAMP): pyproject.toml
	$(PY) -m venv $(FULL_VENV)
	$(FULL_BIN)/pip install --quiet --upgrade pip
	$(FULL_BIN)/pip install --quiet $(FULL_TORCH) -e ".[cpu,full,dev,serve]"
	$(FULL_BIN)/python -c "import torchvision.ops, timm, tiatoolbox"
	touch $(FULL_STAMP)

install: $(STAMP)

install-full: $(FULL_STAMP)

# Headless Chromium and its driver for the browser tests of `histo serve` (Debian packages), installed only
# when missing; elsewhere install chromium and chromedriver with your package manager.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "install chromium and chromedriver (browser tests)"; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# OpenJPEG, the C library glymur (tiatoolbox's JPEG 2000 reader, and the JP2 writer of the reader tests) loads
# at run time; pip cannot install it. A Debian package, installed only when missing.
openjpeg:
	@ldconfig -p | grep -q libopenjp2.so.7 || { \
	  command -v apt-get >/dev/null || { echo "install OpenJPEG 2 (libopenjp2) for the JPEG 2000 tests"; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenjp2-7; }

# Lane 1: the core deps + cpu,dev,serve; the tests needing lane-2 packages are deselected by their marker.
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

# Lane 2: every test marked `full` (encoders vs their reference code, tiatoolbox readers and stain methods in
# .venv-full; the official BraTS scorer's agreement tests call .venv-brats in a subprocess).
test-full: $(FULL_STAMP) $(BRATS_STAMP) openjpeg
	$(FULL_BIN)/python -m pytest tests -q -m full

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python scripts/demo.py --out demo_out

clean:
	rm -rf $(VENV) $(FULL_VENV) $(BRATS_VENV) demo_out bench_out .pytest_cache .ruff_cache
