# `make run` starts the whole stack on loopback; `make test` runs every test;
# `make bench` measures throughput and latency into docs/benchmarks.md (and adding hosts into docs/scaling.md);
# `make images` builds the container images and smoke-tests them through docker-compose.
# Both first install what is missing: Debian packages, the Python environment, the model.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
MODEL_DIR := data/models/SmolLM2-135M-Instruct

.PHONY: setup deps browser-deps cpu run test bench images clean

setup: deps $(VENV)/.installed $(MODEL_DIR)/.converted

deps:
	@bash scripts/install-deps.sh

# The browser tests' Chromium (Debian's), beside the rest.
browser-deps:
	@bash scripts/install-deps.sh --browser

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --progress-bar on -e '.[web,worker,convert,bench,dev]'
	touch $@

$(MODEL_DIR)/.converted: | $(VENV)/.installed
	$(PYTHON) -m workers.fetch_model --dest $(MODEL_DIR)

run: setup
	$(PYTHON) -m scripts.run

# The CPU's name and vector flags first: the engine's dtype and kernels depend on them.
cpu:
	@$(PY) -m workers.cpu

test: cpu browser-deps setup
	$(PYTHON) -m pytest

bench: setup
	$(PYTHON) -m scripts.bench
	$(PYTHON) -m scripts.scale

# The container images (docker/), built and smoke-tested through docker-compose; needs Docker, never part of make
# test. Sizes and the smoke test's figures go to docs/images.md. IMAGES_ARGS: see python -m scripts.images --help.
images: $(VENV)/.installed
	$(PYTHON) -m scripts.images $(IMAGES_ARGS)

clean:
	rm -rf $(VENV) data *.egg-info
