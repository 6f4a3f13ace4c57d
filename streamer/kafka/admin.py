"""Creates the output and dead-letter topics a pipeline writes to, when they are missing."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streamer.config import KafkaSettings
from streamer.errors import StreamerError
from streamer.kafka.client_config import base_config, describe_security

log = logging.getLogger(__name__)


def ensure_topics(
    settings: KafkaSettings, bootstrap: str, topics: Iterable[str], timeout_s: float = 30
) -> None:
    """Create each topic that does not exist yet; existing topics are left as they are."""
    admin = AdminClient(base_config(settings, bootstrap))
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise StreamerError(f"cannot reach Kafka at {bootstrap}: {exc.args[0]}") from None
    missing = sorted(set(topics) - existing)
    if not missing:
        return
    new = [NewTopic(t, settings.partitions, settings.replication_factor) for t in missing]
    for topic, future in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result()
            log.info("created topic %s", topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise StreamerError(f"cannot create topic {topic}: {exc.args[0].str()}") from None


# Errors after which retrying cannot help: the broker refused the login or the TLS handshake failed.
_REFUSED = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._SSL})


def check_access(settings: KafkaSettings, bootstrap: str, timeout_s: float = 30) -> None:
    """Fail fast, naming what failed, when the cluster refuses our login or TLS handshake.

    librdkafka retries a refused login forever, so a client with a wrong password would wait out
    every timeout in silence; its error callback says at once what went wrong.
    """
    seen: list[KafkaError] = []
    admin = AdminClient({**base_config(settings, bootstrap), "error_cb": seen.append})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=0.5)
            return
        except KafkaException as exc:
            seen.append(exc.args[0])
        admin.poll(0)  # serves error_cb
        if refused := next((e for e in seen if e.code() in _REFUSED), None):
            raise StreamerError(f"Kafka at {bootstrap} refused the connection ({describe_security(settings)}): "
                                f"{refused.str()}")
        if time.monotonic() >= deadline:
            last = next((e for e in reversed(seen) if e.code() != KafkaError._TIMED_OUT), seen[-1])
            raise StreamerError(f"cannot reach Kafka at {bootstrap} within {timeout_s:g} s "
                                f"({describe_security(settings)}; does it expect another?): {last.str()}")
