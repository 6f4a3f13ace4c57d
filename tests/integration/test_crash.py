"""A SIGKILLed `streamer run` loses nothing and double-counts nothing once it is started again."""

from __future__ import annotations

import signal
import urllib.request

import orjson
import pytest
import redis
import yaml

from streamer.state.server import free_port
from tests.integration.services import (
    committed_offsets,
    consume_all,
    counters,
    end_offsets,
    produce_lines,
    start_service,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.integration

EVENTS = 120


def test_sigkill_mid_stream_then_restart_loses_nothing_and_counts_once(kafka_bootstrap, redis_url, tmp_path):
    tag = unique_name("crash")
    port = free_port()
    config = tmp_path / "streamer.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {
                    "bootstrap_servers": kafka_bootstrap,
                    "group_id": f"g-{tag}",
                    "dead_letter_topic": f"dlq-{tag}",
                    "commit_interval_ms": 200,
                },
                "redis": {"url": redis_url, "prefix": tag},
                "batching": {"max_batch": 8, "max_queue": 16},
                "observe": {"http_host": "127.0.0.1", "http_port": port},
                "routes": [
                    {"name": "q", "input": f"in-{tag}", "output": f"out-{tag}", "max_new_tokens": 8, "slo_ms": 1}
                ],
            }
        )
    )
    produce_lines(
        kafka_bootstrap,
        f"in-{tag}",
        [
            orjson.dumps({"id": f"c-{i:03d}", "key": f"k{i % 3}", "text": f"Name a colour, number {i}."})
            for i in range(EVENTS)
        ],
    )
    client = redis.Redis.from_url(redis_url)
    log = tmp_path / "service.log"

    first = start_service(config, log)
    wait_for(lambda: counters(client, tag).get("events", 0) >= 30, 300, "the first answers", log)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert counters(client, tag)["events"] < EVENTS, "the kill came too late to test recovery"

    second = start_service(config, log)
    wait_for(lambda: counters(client, tag).get("events", 0) >= EVENTS, 300, "every event", log)
    wait_for(
        lambda: (
            committed_offsets(kafka_bootstrap, f"g-{tag}", f"in-{tag}") == end_offsets(kafka_bootstrap, f"in-{tag}")
        ),
        60,
        "offsets to reach the end",
        log,
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as ready:
        assert ready.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as scrape:
        metrics = scrape.read().decode()
    answered = [line for line in metrics.splitlines() if line.startswith('streamer_answered_total{route="q"}')]
    assert answered and float(answered[0].split()[-1]) > 0  # this process answered what the first left
    misses = [line for line in metrics.splitlines() if line.startswith('streamer_slo_misses_total{route="q"}')]
    assert misses and float(misses[0].split()[-1]) > 0  # no model answers within a 1 ms SLO
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 0, log.read_text()[-3000:]

    final = counters(client, tag)
    assert (final["events"], final["answers"]) == (EVENTS, EVENTS)
    records = sum(end_offsets(kafka_bootstrap, f"out-{tag}").values())  # repeats after the kill are allowed
    answered = {orjson.loads(m.value)["id"] for m in consume_all(kafka_bootstrap, f"out-{tag}", records, 60)}
    assert answered == {f"c-{i:03d}" for i in range(EVENTS)}
