"""Answers reused on replay, on a real broker, redis-server and model: a `streamer run` SIGKILLed mid-stream
and started again asks the model only for the events without a kept answer, and writes the replayed
answers with the bytes first written; a producer that sends an event twice costs one model call."""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from collections import defaultdict
from pathlib import Path

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

EVENTS = 60


def write_config(tmp_path: Path, kafka_bootstrap: str, redis_url: str, tag: str, port: int) -> Path:
    config = tmp_path / "streamer.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}",
                  "commit_interval_ms": 5000},  # a long uncommitted tail at the kill: most of it answered
        "redis": {"url": redis_url, "prefix": tag},
        "batching": {"max_batch": 8, "max_queue": 16},
        "observe": {"http_host": "127.0.0.1", "http_port": port},
        "routes": [{"name": "q", "input": f"in-{tag}", "output": f"out-{tag}", "max_new_tokens": 4}],
    }))
    return config


def events(n: int) -> list[bytes]:
    return [orjson.dumps({"id": f"r-{i:03d}", "key": f"k{i % 3}", "text": f"Name a colour, number {i}."})
            for i in range(n)]


def scrape(port: int) -> dict[str, float]:
    """The route's answered and reused counts from the process's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    values = {}
    for name in ("streamer_answered_total", "streamer_answer_cache_hits_total"):
        found = [line for line in lines if line.startswith(f'{name}{{route="q"}}')]
        values[name] = float(found[0].split()[-1]) if found else 0.0
    return values


def stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, log.read_text()[-3000:]


def test_a_restart_after_sigkill_asks_the_model_only_for_events_without_a_kept_answer(
        kafka_bootstrap, redis_url, tmp_path):
    tag, port = unique_name("reuse"), free_port()
    config = write_config(tmp_path, kafka_bootstrap, redis_url, tag, port)
    produce_lines(kafka_bootstrap, f"in-{tag}", events(EVENTS))
    client = redis.Redis.from_url(redis_url)
    log = tmp_path / "service.log"

    first = start_service(config, log)
    wait_for(lambda: counters(client, tag).get("answers", 0) >= 20, 300, "the first answers", log)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    kept_bytes = {name.decode().rsplit(":", 1)[1]: client.hget(name, "answer")
                  for name in client.scan_iter(f"{tag}:reuse:q:*")}
    kept = len(kept_bytes)
    committed = sum(committed_offsets(kafka_bootstrap, f"g-{tag}", f"in-{tag}").values())
    assert kept == counters(client, tag)["answers"] < EVENTS, "the kill came too late to test recovery"
    assert kept > committed, "no answered event in the replayed tail"

    second = start_service(config, log)
    wait_for(lambda: counters(client, tag).get("events", 0) >= EVENTS, 300, "every event", log)
    wait_for(lambda: committed_offsets(kafka_bootstrap, f"g-{tag}", f"in-{tag}") == end_offsets(
        kafka_bootstrap, f"in-{tag}"), 60, "offsets to reach the end", log)
    seen = scrape(port)
    stop(second, log)

    hits = seen["streamer_answer_cache_hits_total"]
    model_calls = seen["streamer_answered_total"] - hits
    print(f"restart after {kept} of {EVENTS} answered ({committed} committed): {model_calls:.0f} model calls, "
          f"{hits:.0f} answers reused")
    assert hits == kept - committed, "every replayed event with a kept answer is answered from Redis"
    assert model_calls == EVENTS - kept, "the model answers only the events without a kept answer"
    final = counters(client, tag)
    assert (final["events"], final["answers"]) == (EVENTS, EVENTS)

    records = consume_all(kafka_bootstrap, f"out-{tag}", sum(end_offsets(kafka_bootstrap, f"out-{tag}").values()), 60)
    by_id: dict[str, list[bytes]] = defaultdict(list)
    for record in records:
        assert record.value is not None
        by_id[orjson.loads(record.value)["id"]].append(record.value)
    assert len(by_id) == EVENTS
    replayed = {event_id: values for event_id, values in by_id.items() if event_id in kept_bytes and len(values) > 1}
    assert len(replayed) == hits, "every answer reused is on the topic again"
    assert all(set(values) == {kept_bytes[event_id]} for event_id, values in replayed.items()), (
        "a replayed answer has the bytes first written")


def test_an_event_sent_twice_costs_one_model_call(kafka_bootstrap, redis_url, tmp_path):
    tag, port = unique_name("twice"), free_port()
    config = write_config(tmp_path, kafka_bootstrap, redis_url, tag, port)
    client = redis.Redis.from_url(redis_url)
    log = tmp_path / "service.log"
    service = start_service(config, log)
    try:
        produce_lines(kafka_bootstrap, f"in-{tag}", events(10))
        wait_for(lambda: counters(client, tag).get("answers", 0) >= 10, 300, "the first sends answered", log)
        produce_lines(kafka_bootstrap, f"in-{tag}", events(10))  # the producer sends them all again
        wait_for(lambda: counters(client, tag).get("answers", 0) >= 20, 120, "the second sends answered", log)
        seen = scrape(port)
    finally:
        stop(service, log)
    assert seen == {"streamer_answered_total": 20, "streamer_answer_cache_hits_total": 10}
    answers: dict[str, list[dict[str, object]]] = defaultdict(list)
    for record in consume_all(kafka_bootstrap, f"out-{tag}", 20, 60):
        assert record.value is not None
        doc = orjson.loads(record.value)
        answers[doc["id"]].append(doc)
    assert len(answers) == 10 and all(len(docs) == 2 for docs in answers.values())
    for first, second in answers.values():
        assert first["output"] == second["output"] and first["tokens_out"] == second["tokens_out"]
        assert first["source"] != second["source"], "each record's answer names that record"
