"""The real services the integration suite runs against behave like the real thing."""

from __future__ import annotations

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from tests.integration.services import (
    committed_offsets,
    consume_all,
    create_topic,
    end_offsets,
    produce_lines,
    unique_name,
)

pytestmark = pytest.mark.integration


def test_broker_round_trips_a_keyed_message_and_reports_committed_offsets(kafka_bootstrap: str) -> None:
    topic, group = unique_name("smoke"), unique_name("smoke-group")
    create_topic(kafka_bootstrap, topic, partitions=3)

    [sent] = produce_lines(kafka_bootstrap, topic, [b'{"id": "1"}'], keys=[b"user-1"])

    [got] = consume_all(kafka_bootstrap, topic, expected=1, timeout_s=30)
    assert (got.key, got.value, got.partition, got.offset) == (b"user-1", b'{"id": "1"}', sent.partition, 0)
    assert end_offsets(kafka_bootstrap, topic) == {0: 0, 1: 0, 2: 0} | {sent.partition: 1}
    assert committed_offsets(kafka_bootstrap, group, topic) == {
        0: 0,
        1: 0,
        2: 0,
    }  # consume_all commits nothing

    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, sent.partition, 1)], asynchronous=False)
    finally:
        consumer.close()
    assert committed_offsets(kafka_bootstrap, group, topic) == end_offsets(kafka_bootstrap, topic)


def test_redis_server_answers_ping_and_keeps_values(redis_client: redis.Redis) -> None:
    assert redis_client.ping()
    assert redis_client.dbsize() == 0  # the fixture hands out an emptied database
    redis_client.set("smoke", "value")
    assert redis_client.get("smoke") == b"value"
