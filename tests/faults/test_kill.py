"""SIGKILL of `streamer run` mid-window and mid-transaction, then a restart: nothing lost, nothing doubled.

On both route shapes of tests/faults/scenario.py: windows only, and windows on a route that classifies
every event with a model (requests in flight when the kill lands).
"""

from __future__ import annotations

import time

import orjson
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from tests.faults.scenario import Service, Stream, check, kill, produce, read_topic, report, stop
from tests.integration.services import create_topic, unique_name

pytestmark = pytest.mark.integration


def open_transaction(bootstrap: str, topics: list[str]) -> bool:
    """Whether records sit above the last stable offset: a transaction was left open."""
    committed = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("lso"),
                          "isolation.level": "read_committed"})
    everything = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("hw")})
    try:
        for topic in topics:
            for partition in committed.list_topics(topic, timeout=10).topics[topic].partitions:
                tp = TopicPartition(topic, partition)
                stable = committed.get_watermark_offsets(tp, timeout=10, cached=False)[1]
                if stable < everything.get_watermark_offsets(tp, timeout=10, cached=False)[1]:
                    return True
        return False
    finally:
        committed.close()
        everything.close()


def wait_for_window_write(redis_url: str, prefix: str, timeout_s: float) -> None:
    """Return the moment a window result reaches Redis: in exactly-once mode that is the start of a
    write cycle, before its Kafka transaction commits."""
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"{prefix}:windows")
    try:
        deadline = time.monotonic() + timeout_s
        while pubsub.get_message(timeout=0.5) is None:
            assert time.monotonic() < deadline, f"no window written for {timeout_s} s"
    finally:
        pubsub.close()
        client.close()


@pytest.mark.parametrize("shape", ["count", "reviews"])
def test_sigkill_mid_window_and_mid_transaction_then_restart(kafka_bootstrap, redis_url, tmp_path, shape):
    """Input arrives in slices while the service is killed and restarted: first mid-window (windows
    of every key open), then at the moment its transaction's first record shows on the output topic;
    the kill counts as mid-transaction only when records were left above the last stable offset."""
    service, stream = Service(tmp_path, kafka_bootstrap, redis_url, shape=shape), Stream()
    create_topic(kafka_bootstrap, service.input, partitions=3)
    slices = iter(range(0, stream.events, 300))

    def produce_slice() -> None:
        start = next(slices)
        produce(kafka_bootstrap, service.input, stream, start, start + 300, rate_per_s=None)

    produce_slice()
    first = service.start("a")
    service.wait(lambda: service.counters().get("windows", 0) >= 8, 120, "the first windows")
    kill(first)  # mid-window: every key has a window open
    assert service.counters().get("windows", 0) < len(stream.expected_windows())

    hits: list[str] = []
    for _ in range(4):  # the kill races the commit; a few tries make a hit near certain
        produce_slice()
        process = service.start("a")
        wait_for_window_write(redis_url, service.tag, 120)
        kill(process)
        time.sleep(1.0)  # the stable offset trails a commit marker briefly
        if open_transaction(kafka_bootstrap, [service.output, service.dead_letters]):
            hits.append("kafka transaction open")
        committed = sum(1 for v in read_topic(kafka_bootstrap, service.output, committed=True)
                        if orjson.loads(v)["final"])
        if service.counters().get("windows", 0) > committed:
            hits.append("redis ahead of kafka")
        if hits:
            break
    for rest in slices:
        produce(kafka_bootstrap, service.input, stream, rest, rest + 300, rate_per_s=None)
    last = service.start("a")
    recovery_s = service.wait(service.progressed(), 120, "the restarted service to commit")
    service.wait(service.finished, 180, "offsets at the end")
    assert stop(last) == 0
    outcome = check(service, stream)
    assert hits, "no kill landed between the Redis write and the Kafka commit"
    report(f"sigkill mid-window + mid-transaction, {shape} ({', '.join(hits)})", outcome, recovery_s)
    assert outcome.late == 0, "a replay judged events otherwise than the first run (or a backlog turned late)"
