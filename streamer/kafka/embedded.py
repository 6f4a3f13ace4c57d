"""The embedded default: librdkafka's built-in mock cluster, so a first run needs no broker.

The cluster lives inside one holder client; the other clients reach it over loopback at the address
librdkafka logs when it starts the cluster.
"""

from __future__ import annotations

import logging
import re
import time

from confluent_kafka import Producer

from streamer.errors import StreamerError

_ADDRESS = re.compile(r"bootstrap\.servers=(\S+)")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.address: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        found = _ADDRESS.search(record.getMessage())
        if found and self.address is None:
            self.address = found.group(1)


class EmbeddedKafka:
    """A single-broker mock cluster; topics are created on first use. Not durable: for demos only."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        capture = _Capture()
        logger = logging.getLogger(f"streamer.embedded-kafka.{id(self)}")
        logger.propagate = False
        logger.addHandler(capture)
        logger.setLevel(logging.DEBUG)
        self._holder = Producer({"test.mock.num.brokers": 1, "logger": logger, "debug": "mock"})
        deadline = time.monotonic() + timeout_s
        while capture.address is None and time.monotonic() < deadline:
            self._holder.poll(0.05)
        if capture.address is None:
            raise StreamerError("librdkafka's mock cluster did not report its address")
        self.bootstrap: str = capture.address

    def close(self) -> None:
        self._holder.flush(1)
        del self._holder
