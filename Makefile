# wsi_lightning: every target sets up .venv itself on first use (idempotent stamp).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# OpenSeadragon for `wsi view`, from the npm registry into .vendor/ (pinned; wsi_lightning/viewer/assets.py
# names the same version, and tests/test_viewer.py checks that they agree)
OSD_VERSION := 6.1.1
OSD    := .vendor/node_modules/openseadragon/.installed-$(OSD_VERSION)
SETUP  := $(STAMP) $(OSD)
EXP    ?= abmil
TABLE  ?=
DATA   ?= demo
SWEEP  ?= abmil_lr
ARGS   ?=

.PHONY: help install test test-all exp demo-data bench lint reproduce sweep clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# without npm (or the registry) everything but `wsi view` still works: a warning, and the next make retries
$(OSD):
	@if ! command -v npm >/dev/null; then \
	  echo "warning: npm not found, so wsi view has no OpenSeadragon; install Node.js + npm (apt-get install -y npm) and rerun make install"; \
	elif npm install --prefix .vendor openseadragon@$(OSD_VERSION) --no-audit --no-fund --loglevel=error; then \
	  touch $(OSD); \
	else echo "warning: npm install openseadragon@$(OSD_VERSION) failed; wsi view needs it (rerun make install)"; fi

install: $(SETUP)  ## create .venv, install the package and OpenSeadragon (done automatically by other targets)

test: $(SETUP)  ## fast unit suite + DDP test (offline, CPU, < 10 min)
	$(PY) -m pytest -m "not slow and not gpu" -q $(ARGS)

test-all: $(SETUP)  ## everything, slow and gpu-marked included (gpu skips without CUDA)
	$(PY) -m pytest -q $(ARGS)

exp: $(SETUP)  ## run an experiment: make exp EXP=abmil [ARGS="trainer.max_epochs=5"]
	$(VENV)/bin/wsi fit $(EXP) $(ARGS)

demo-data: $(STAMP)  ## generate the built-in synthetic demo slides
	$(VENV)/bin/wsi demo-data $(ARGS)

bench: $(STAMP)  ## benchmarks (bench/results/*.json): make bench [ARGS="--quick --only sampling --results DIR"]
	$(PY) -m bench $(ARGS)

reproduce: $(SETUP)  ## paper tables: make reproduce [TABLE=interpretability] [DATA=demo|camelyon16]
	$(VENV)/bin/wsi reproduce $(TABLE) --data $(DATA) $(ARGS)

sweep: $(SETUP)  ## hyperparameter sweep: make sweep SWEEP=abmil_lr [ARGS="--count 4 --offline"]
	$(VENV)/bin/wsi sweep $(SWEEP) $(ARGS)

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check wsi_lightning tests bench

clean:  ## remove runs and caches (keeps .venv and data)
	rm -rf runs .pytest_cache .ruff_cache
