"""Suite-wide settings and the real services tests share: one Kafka broker, one redis-server, the model.

This 2-core machine is noisy, so property tests judge outcomes, not speed. Point the suite at
existing services with KAFKA_BOOTSTRAP_SERVERS and REDIS_URL; otherwise it starts its own (see
tests/integration/services.py) and stops them when the session ends. Fixtures start only when a
test asks for them, so the unit tests start nothing; torch and transformers load with the `worker`
fixture, not at collection, so tests without a model do not pay for importing them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import redis
from hypothesis import HealthCheck, settings

from streamer.config import ModelSettings
from streamer.state.server import RedisServer
from tests.integration.services import LlamaServer, kafka_service, llama_service

if TYPE_CHECKING:
    from streamer.engine.worker import LLMWorker

settings.register_profile("streamer", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("streamer")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """bootstrap.servers of a real broker (auto-creates topics; 3 partitions by default when native)."""
    with kafka_service(tmp_path_factory.mktemp("kafka")) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real redis-server; tests share it, so they namespace their keys (or use redis_client)."""
    configured = os.environ.get("REDIS_URL")
    if configured:
        yield configured
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on an emptied database (FLUSHDB first), closed after the test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def worker() -> LLMWorker:
    """The real default model, loaded once for the session (from the local cache after the first run)."""
    from streamer.engine.load import load_worker  # torch and transformers

    return load_worker(ModelSettings())


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """llama.cpp's llama-server serving the default model's GGUF: the third-party OpenAI-compatible server."""
    with llama_service(tmp_path_factory.mktemp("llama")) as server:
        yield server
