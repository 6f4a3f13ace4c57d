"""Conversations (`task: chat`) on a real broker, redis-server and model: 20 conversations of 6 turns interleaved
on 3 partitions, a `streamer run` SIGKILLed in the middle and started again. Every conversation is answered in
turn order, its history in Redis holds each turn exactly once, and none is lost; a replayed turn found in the
history costs no model call and is written again with its first bytes."""

from __future__ import annotations

import signal
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
import redis
import yaml

from streamer.state.server import free_port
from streamer.tasks.chat import History, decode
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

CONVERSATIONS = 20
TURNS = 6
NAMES = ("Ada", "Bo", "Cy", "Di", "Ed")


def write_config(tmp_path: Path, kafka_bootstrap: str, redis_url: str, tag: str, port: int) -> Path:
    config = tmp_path / "streamer.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}",
                  "commit_interval_ms": 5000,  # a long uncommitted tail at the kill: most of it answered
                  "client": {"session.timeout.ms": 6000}},  # the killed member leaves the group in 6 s, not 45
        "redis": {"url": redis_url, "prefix": tag},
        "batching": {"max_batch": 8, "max_queue": 32},
        "observe": {"http_host": "127.0.0.1", "http_port": port},
        "routes": [{"name": "c", "input": f"in-{tag}", "output": f"out-{tag}", "task": "chat",
                    "max_new_tokens": 8, "max_history_tokens": 96}],  # folds after a few turns
    }))
    return config


def turns() -> tuple[list[bytes], list[bytes], list[int]]:
    """Values, keys and partitions: turn 1 of every conversation, then turn 2 of every one, ...; a conversation
    stays on one partition."""
    values, keys, partitions = [], [], []
    for t in range(TURNS):
        for c in range(CONVERSATIONS):
            text = f"My name is {NAMES[c % len(NAMES)]}. Tell me fact {t} about the number {c}."
            values.append(orjson.dumps({"id": f"c{c:02d}-t{t}", "text": text}))
            keys.append(f"conv-{c:02d}".encode())
            partitions.append(c % 3)
    return values, keys, partitions


def histories(client: redis.Redis, tag: str) -> dict[str, History]:
    found = {}
    for name in client.scan_iter(f"{tag}:chat:c:*"):
        doc = client.hget(name, "doc")
        assert doc is not None
        found[name.decode().rsplit(":", 1)[1]] = decode(doc)
    return found


def in_history(client: redis.Redis, tag: str) -> dict[str, bytes]:
    """Turn id -> its answer record as the history keeps it."""
    return {i: answer.encode() for h in histories(client, tag).values() for i, answer in h.answers}


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    values = {}
    for name in ("streamer_answered_total", "streamer_answer_cache_hits_total"):
        found = [line for line in lines if line.startswith(f'{name}{{route="c"}}')]
        values[name] = float(found[0].split()[-1]) if found else 0.0
    return values


def test_conversations_answered_in_order_through_a_sigkill_lose_no_turn_and_repeat_none(
        kafka_bootstrap, redis_url, tmp_path):
    tag, port = unique_name("chat"), free_port()
    config = write_config(tmp_path, kafka_bootstrap, redis_url, tag, port)
    values, keys, partitions = turns()
    total = len(values)
    where = {orjson.loads(r.value)["id"]: (r.partition, r.offset)
             for r in produce_lines(kafka_bootstrap, f"in-{tag}", values, keys, partitions=partitions)}
    client = redis.Redis.from_url(redis_url)
    log = tmp_path / "service.log"

    began = time.monotonic()
    first = start_service(config, log)
    wait_for(lambda: len(in_history(client, tag)) >= 2 * CONVERSATIONS + 5, 300, "turns in the histories", log)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    kept = in_history(client, tag)
    committed = committed_offsets(kafka_bootstrap, f"g-{tag}", f"in-{tag}")
    replayed = {i for i in kept if where[i][1] >= committed.get(where[i][0], 0)}
    assert len(kept) < total, "the kill came too late to test recovery"
    assert replayed, "no turn in the histories was left uncommitted"

    second = start_service(config, log)
    wait_for(lambda: counters(client, tag).get("events", 0) >= total, 300, "every turn", log)
    wait_for(lambda: committed_offsets(kafka_bootstrap, f"g-{tag}", f"in-{tag}") == end_offsets(
        kafka_bootstrap, f"in-{tag}"), 60, "offsets to reach the end", log)
    seen = scrape(port)
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 0, log.read_text()[-3000:]
    elapsed = time.monotonic() - began

    hits = seen["streamer_answer_cache_hits_total"]
    model_calls = seen["streamer_answered_total"] - hits
    print(f"killed with {len(kept)} of {total} turns in the histories ({len(replayed)} uncommitted); the restart "
          f"asked the model {model_calls:.0f} times and answered {hits:.0f} from the histories; {elapsed:.1f} s")
    assert hits == len(replayed), "every replayed turn found in its history is answered from it"
    assert model_calls == total - len(kept), "the model answers only the turns not in the histories"

    final = histories(client, tag)
    expected = {f"conv-{c:02d}": [f"c{c:02d}-t{t}" for t in range(TURNS)] for c in range(CONVERSATIONS)}
    assert {key: [i for i, _ in h.answers] for key, h in final.items()} == expected, (
        "each conversation's history holds its turns once each, in order")
    assert all(h.summary for h in final.values()), "the oldest turns were folded into a running summary"
    final_counts = counters(client, tag)
    assert (final_counts["events"], final_counts["answers"], final_counts.get("dead_letters", 0)) == (total, total, 0)

    held = {i: answer for h in final.values() for i, answer in h.answers}
    records = consume_all(kafka_bootstrap, f"out-{tag}", sum(end_offsets(kafka_bootstrap, f"out-{tag}").values()), 60)
    firsts: dict[str, list[str]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert record.value is not None
        doc = orjson.loads(record.value)
        assert record.value == held[doc["id"]].encode(), "every answer on the topic is its history's, byte for byte"
        if doc["id"] not in firsts[doc["key"]]:
            firsts[doc["key"]].append(doc["id"])
    assert dict(firsts) == expected, "a reader sees each conversation's turns first answered in turn order"
