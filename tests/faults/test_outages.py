"""Redis and the Kafka broker each stopped for 20 s mid-stream: the service waits, retries with
backoff, catches up, and loses or doubles nothing; and Redis stopped for longer than the consumer's
max.poll.interval.ms under exactly once ends in recovery, not a livelock.

On both route shapes of tests/faults/scenario.py (windows only; windows on a route that classifies
every event with a model). All use services of the test's own, never the session's shared broker and
redis-server.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request

import pytest

from streamer.state.server import free_port
from tests.faults.scenario import (
    RestartableKafka,
    RestartableRedis,
    Service,
    Stream,
    check,
    produce,
    producing,
    report,
    stop,
)
from tests.integration.services import create_topic, native_kafka

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 20


def events_in(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as scrape:
        found = re.search(r'^streamer_events_in_total\{route="w"\} (\S+)$', scrape.read().decode(), re.M)
    return float(found.group(1)) if found else 0.0


def started(service: Service, bootstrap: str, first: int) -> tuple[Stream, subprocess.Popen[bytes]]:
    """A fresh stream's first `first` events on a 3-partition input, the service started on them and its
    first windows written: the moment each outage begins."""
    stream = Stream()
    service.http_port = free_port()
    create_topic(bootstrap, service.input, partitions=3)
    produce(bootstrap, service.input, stream, 0, first, rate_per_s=None)
    process = service.start()
    service.wait(lambda: service.counters().get("windows", 0) >= 8, 120, "the first windows")
    return stream, process


@pytest.mark.parametrize("shape", ["count", "reviews"])
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_redis_stopped_for_20_s_pauses_consumption_then_catches_up(kafka_bootstrap, tmp_path, guarantee, shape):
    """While Redis is away the write cycle retries with backoff and consumption pauses: at least once,
    outcomes pile up to `max_queue`; exactly once, the consumer is not polled while a transaction's
    Redis write waits. Events consumed stop growing though input waits, no window closes by the wall
    clock meanwhile, and once Redis is back everything is written, once."""
    own_redis = RestartableRedis(tmp_path)
    own_redis.start()
    try:
        # A small bound, so the window results and dead letters of the outage reach it within seconds.
        service = Service(tmp_path, kafka_bootstrap, own_redis.url, guarantee, max_queue=32, shape=shape)
        stream, process = started(service, kafka_bootstrap, 600)
        own_redis.stop()
        with producing(kafka_bootstrap, service.input, stream, 600, rate_per_s=(stream.events - 600) / OUTAGE_S):
            time.sleep(OUTAGE_S - 6)
            consumed = events_in(service.http_port)
            time.sleep(6)
            assert events_in(service.http_port) == consumed, "consumption did not pause"
        assert consumed < stream.events and process.poll() is None
        own_redis.start()
        recovery_s = service.wait(service.progressed(), 120, "commits after Redis returned")
        service.wait(service.finished, 180, "offsets at the end")
        assert stop(process) == 0
        assert "redis write failed" in service.log.read_text()
        outcome = check(service, stream)
        report(f"redis stopped {OUTAGE_S} s ({guarantee}, {shape})", outcome, recovery_s)
        assert outcome.late == 0, "a paused consumer's partitions went idle and the backlog turned late"
    finally:
        own_redis.stop()


@pytest.mark.parametrize("shape", ["count", "reviews"])
@pytest.mark.parametrize(("guarantee", "session_timeout_ms"), [
    ("at_least_once", 45_000), ("exactly_once", 45_000),  # the member keeps its partitions
    ("at_least_once", 6_000), ("exactly_once", 6_000),  # it loses them and replays into its windows
])
def test_kafka_broker_stopped_for_20_s_then_restarted(redis_url, tmp_path, guarantee, session_timeout_ms, shape):
    """The transaction under way when the broker goes waits for it, or is aborted and produced again
    (by a fresh producer if a call never answers), until the broker is back on its old data; the
    instance then catches up by itself, and the consumer resumes from the committed offsets.

    Meanwhile no window closes by the wall clock: partitions whose broker is away are cut off, not
    idle. With a session shorter than the outage the member's partitions are lost and assigned
    again: their events leave the open windows and are replayed into them, none of them late."""
    run_dir = tmp_path / "kafka"
    with native_kafka(run_dir) as bootstrap:
        broker = RestartableKafka(run_dir, bootstrap)
        # The transaction outlasts the outage: records and the commit wait for the broker.
        service = Service(tmp_path, bootstrap, redis_url, guarantee, transaction_timeout_ms=60_000,
                          session_timeout_ms=session_timeout_ms, shape=shape)
        stream, process = started(service, bootstrap, 1200)
        broker.stop()
        time.sleep(OUTAGE_S)
        assert process.poll() is None, "the service died with the broker"
        broker.start()
        back_at = time.monotonic()
        produce(bootstrap, service.input, stream, 1200, stream.events, rate_per_s=None)
        service.wait(service.finished, 120, "offsets at the end")
        recovery_s = time.monotonic() - back_at
        assert stop(process) == 0
        outcome = check(service, stream)
        report(f"kafka broker stopped {OUTAGE_S} s ({guarantee}, session {session_timeout_ms // 1000} s, {shape})",
               outcome, recovery_s)
        assert outcome.late == 0, "partitions cut off by the outage went idle and the replay turned late"


MAX_POLL_S = 15


def test_exactly_once_redis_away_longer_than_max_poll_interval_ends_in_recovery(kafka_bootstrap, tmp_path):
    """Review finding 6: a write cycle retried Redis for ever without polling the consumer; past
    max.poll.interval.ms the member left its group, and every later transaction failed for ever while
    /healthz stayed green. With max.poll.interval.ms lowered to 15 s and Redis away 25 s: a cycle waits at
    most 5 s (a third of it), the consumer keeps being polled between cycles, and everything is written
    once Redis is back."""
    own_redis = RestartableRedis(tmp_path)
    own_redis.start()
    try:
        service = Service(tmp_path, kafka_bootstrap, own_redis.url, "exactly_once", max_queue=32, shape="reviews",
                          max_poll_interval_ms=MAX_POLL_S * 1000)
        stream, process = started(service, kafka_bootstrap, 600)
        own_redis.stop()
        outage_s = MAX_POLL_S + 10
        with producing(kafka_bootstrap, service.input, stream, 600, rate_per_s=(stream.events - 600) / outage_s):
            time.sleep(outage_s)
        assert process.poll() is None
        own_redis.start()
        recovery_s = service.wait(service.progressed(), 120, "commits after Redis returned")
        service.wait(service.finished, 180, "offsets at the end")
        assert stop(process) == 0
        log = service.log.read_text()
        assert "leaving group" not in log.lower() and "lost " not in log, "the member stayed in its group"
        outcome = check(service, stream)
        report(f"redis stopped {outage_s} s > max.poll.interval {MAX_POLL_S} s (exactly_once, reviews)", outcome,
               recovery_s)
        assert outcome.late == 0, "the input was not paused while Redis was away"
    finally:
        own_redis.stop()
