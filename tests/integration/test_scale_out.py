"""Scale-out is Kafka's own: two `streamer run` processes in one group share a 6-partition topic."""

from __future__ import annotations

import signal
import urllib.request

import orjson
import pytest
import redis
import yaml

from streamer.state.server import free_port
from tests.integration.services import (
    counters,
    create_topic,
    produce_lines,
    start_service,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.integration

EVENTS = 60


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def assigned_partitions(port: int) -> set[int]:
    """The partitions whose lag this process reports: exactly those it owns."""
    lines = [line for line in scrape(port).splitlines() if line.startswith("streamer_consumer_lag{")]
    return {int(line.split('partition="')[1].split('"')[0]) for line in lines}


def answered(port: int) -> float:
    lines = [line for line in scrape(port).splitlines() if line.startswith("streamer_answered_total{")]
    return sum(float(line.split()[-1]) for line in lines)


def test_two_instances_in_one_group_split_six_partitions_and_both_answer(kafka_bootstrap, redis_url, tmp_path):
    tag = unique_name("scale")
    create_topic(kafka_bootstrap, f"in-{tag}", partitions=6)
    ports = [free_port(), free_port()]
    procs, logs = [], []
    for n, port in enumerate(ports):
        config = tmp_path / f"streamer-{n}.yaml"
        config.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}",
                      "commit_interval_ms": 200},
            "redis": {"url": redis_url, "prefix": tag},
            "observe": {"http_host": "127.0.0.1", "http_port": port},
            "routes": [{"name": "q", "input": f"in-{tag}", "output": f"out-{tag}", "max_new_tokens": 4}],
        }))
        logs.append(tmp_path / f"service-{n}.log")
        procs.append(start_service(config, logs[-1]))
    try:
        for port, log in zip(ports, logs, strict=True):
            wait_for(lambda port=port: len(_try(assigned_partitions, port)) == 3, 180, "3 partitions each", log)
        assert assigned_partitions(ports[0]) | assigned_partitions(ports[1]) == set(range(6))

        produce_lines(kafka_bootstrap, f"in-{tag}",
                      [orjson.dumps({"id": f"s-{i}", "text": f"Say the number {i}."}) for i in range(EVENTS)],
                      partitions=[i % 6 for i in range(EVENTS)])
        client = redis.Redis.from_url(redis_url)
        wait_for(lambda: counters(client, tag).get("answers", 0) >= EVENTS, 300, "every answer", logs[0])
        assert all(answered(port) > 0 for port in ports)  # both exported metrics of their own work
        # The dashboard, served by either process, shows the answers of both: every partition appears.
        url = f"http://127.0.0.1:{ports[0]}/api/snapshot?limit={EVENTS}"
        with urllib.request.urlopen(url, timeout=10) as response:
            snapshot = orjson.loads(response.read())
        assert {a["answer"]["source"]["partition"] for a in snapshot["answers"]} == set(range(6))
        assert snapshot["counters"]["answers"] == EVENTS
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, log in zip(procs, logs, strict=True):
            assert proc.wait(60) == 0, log.read_text()[-2000:]


def _try(probe, port: int) -> set[int]:
    try:
        return probe(port)
    except OSError:
        return set()  # not listening yet: the model is still loading
