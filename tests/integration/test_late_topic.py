"""An input topic created after the consumer subscribed is read within seconds, while the group already
consumes another one (librdkafka would otherwise notice it only at its next periodic metadata
refresh, 5 minutes by default)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from streamer.config import KafkaSettings
from streamer.kafka.client_config import TOPIC_DISCOVERY_MS, consumer_config
from streamer.kafka.offsets import TP
from streamer.kafka.source import KafkaSource
from tests.integration.services import create_topic, unique_name

pytestmark = pytest.mark.integration


class Listener:
    """Hears of assignments only."""

    def __init__(self, assigned: list[TP]) -> None:
        self._assigned = assigned

    def assigned(self, tps: list[TP]) -> None:
        self._assigned.extend(tps)

    def restored(self, tp: TP, mark_ms: int | None) -> None:
        pass

    def revoked(self, tps: list[TP]) -> None:
        pass

    def lost(self, tps: list[TP]) -> None:
        pass

    def commit_failed(self, tps: list[TP]) -> None:
        pass


def test_a_topic_created_after_subscribing_is_consumed_within_seconds(kafka_bootstrap):
    early, topic = unique_name("early"), unique_name("late")
    create_topic(kafka_bootstrap, early, partitions=1)
    config = consumer_config(KafkaSettings(group_id=unique_name("g")), kafka_bootstrap)
    assigned: list[TP] = []
    source = KafkaSource(config, [early, topic], Listener(assigned))
    try:
        while not assigned:  # the group formed around the topic that exists
            assert source.poll(10) == []
            time.sleep(0.1)
        create_topic(kafka_bootstrap, topic, partitions=1)
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(topic, b"hello")
        assert producer.flush(30) == 0
        created = time.monotonic()
        got = []
        while not got:
            assert time.monotonic() - created < 3 * TOPIC_DISCOVERY_MS / 1000 + 10, "the new topic was not picked up"
            got = source.poll(10)
            time.sleep(0.1)
        assert [m.value for m in got] == [b"hello"]
        print(f"\nnew topic consumed {time.monotonic() - created:.1f} s after it was created")
    finally:
        source.close()
