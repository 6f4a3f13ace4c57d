"""Creates the output and dead-letter topics a pipeline writes to, when they are missing."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streamer.config import KafkaSettings
from streamer.errors import StreamerError
from streamer.kafka.client_config import base_config

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
