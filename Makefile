# wsi_lightning: every target sets up .venv itself on first use (idempotent stamp).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
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

install: $(STAMP)  ## create .venv and install the package (done automatically by other targets)

test: $(STAMP)  ## fast unit suite + DDP test (offline, CPU, < 10 min)
	$(PY) -m pytest -m "not slow and not gpu" -q $(ARGS)

test-all: $(STAMP)  ## everything, slow and gpu-marked included (gpu skips without CUDA)
	$(PY) -m pytest -q $(ARGS)

exp: $(STAMP)  ## run an experiment: make exp EXP=abmil [ARGS="trainer.max_epochs=5"]
	$(VENV)/bin/wsi fit $(EXP) $(ARGS)

demo-data: $(STAMP)  ## generate the built-in synthetic demo slides
	$(VENV)/bin/wsi demo-data $(ARGS)

bench: $(STAMP)  ## benchmarks (bench/results/*.json): make bench [ARGS="--quick --only sampling --results DIR"]
	$(PY) -m bench $(ARGS)

reproduce: $(STAMP)  ## paper tables: make reproduce [TABLE=interpretability] [DATA=demo|camelyon16]
	$(VENV)/bin/wsi reproduce $(TABLE) --data $(DATA) $(ARGS)

sweep: $(STAMP)  ## hyperparameter sweep: make sweep SWEEP=abmil_lr [ARGS="--count 4 --offline"]
	$(VENV)/bin/wsi sweep $(SWEEP) $(ARGS)

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check wsi_lightning tests bench

clean:  ## remove runs and caches (keeps .venv and data)
	rm -rf runs .pytest_cache .ruff_cache
