"""The real Kafka broker and redis-server a benchmark runs against: the same ones the test suite uses.

`KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL` when set, else a native broker (ops/kafka) and a redis-server
child process, started for the duration.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from streamer.state.server import RedisServer
from tests.integration.services import kafka_service


@contextlib.contextmanager
def kafka_broker() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="streamer-bench-kafka-") as run_dir, kafka_service(Path(run_dir)) as bs:
        yield bs


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    with RedisServer() as server:
        yield server.url
