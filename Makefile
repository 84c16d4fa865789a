# dsr_lightning: `make help` lists the targets.
PY     ?= .venv/bin/python
VENV   ?= .venv

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: ## Create .venv and install the package with the pinned CI stack (torch 2.14.1, torchvision 0.29.1)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/ci-constraints.txt -e ".[dev]"

demo: install ## Install, then the main job from the given networks on the embedded data (CPU, 128 s after the install; SIGMA=0.5)
	PY=$(PY) bash scripts/demo.sh

demo-full: install ## The whole pipeline, training f and D too (CPU, ~5 min after the install)
	PY=$(PY) bash scripts/demo_full.sh

given: install ## Make the demo's given networks again, into dsr_lightning/pretrained_models (CPU, ~6 min)
	PY=$(PY) bash scripts/make_given.sh

test: install ## Run the test suite: the fast loop and the tests that launch a process (CPU only)
	$(PY) -m pytest -q -m "not slow"

test-fast: ## The fast loop (no install, no new processes): `pytest` alone runs the same
	$(PY) -m pytest -q

test-slow: install ## Run the slow tests too (DDP, subprocess kill/resume)
	$(PY) -m pytest -q -m ""

wheel-check: install ## Build the wheel, install it with its dependencies into a fresh venv, run tiny stages from it (CI)
	PY=$(PY) bash scripts/check_wheel.sh

lint: ## ruff check
	$(PY) -m ruff check .

docs: install ## Build the documentation site into site/ (strict: a broken link fails)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench: ## Speed benchmarks on this machine (engine vs reference loop; training throughput)
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_train.py

clean: ## Remove run outputs (keeps .venv)
	rm -rf outputs multirun site .pytest_cache .ruff_cache

.PHONY: help install demo demo-full given test test-fast test-slow wheel-check lint docs bench clean
