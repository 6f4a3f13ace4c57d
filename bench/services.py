"""A real Kafka broker and redis-server for benchmarks: the ones given in the environment, else native ones."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from streamer.state.server import RedisServer, free_port

KAFKA_SH = Path(__file__).parents[1] / "ops" / "kafka" / "kafka.sh"


@contextlib.contextmanager
def kafka_broker() -> Iterator[str]:
    """`KAFKA_BOOTSTRAP_SERVERS`, or a fresh native broker (ops/kafka) for the duration."""
    if bootstrap := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield bootstrap
        return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="streamer-bench-kafka-") as run_dir:
        args = ["--port", str(port), "--dir", run_dir]
        subprocess.run([str(KAFKA_SH), "start", *args], check=True, stdout=subprocess.DEVNULL)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            subprocess.run([str(KAFKA_SH), "stop", *args], check=False, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """`REDIS_URL`, or a real redis-server on a free port for the duration."""
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    with RedisServer() as server:
        yield server.url
