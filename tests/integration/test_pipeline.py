"""The vertical slice against a real Kafka broker, a real redis-server and the real SmolLM2 model."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import orjson
import pytest
import redis

from streamer.config import Settings
from streamer.engine.build import resident
from streamer.pipeline.app import Pipeline, connect
from tests.integration.services import committed_offsets, consume_all, end_offsets, produce_lines, unique_name

pytestmark = pytest.mark.integration

VALID = 200
MALFORMED: list[tuple[bytes, str]] = [
    (b"this is not json", "invalid_json"),
    (b"\xff\xfe\xfd binary", "invalid_json"),
    (b"", "invalid_json"),
    (b"[1, 2, 3]", "schema"),
    (b'{"text": "an event without an id"}', "schema"),
    (b'{"id": "m-empty", "text": ""}', "schema"),
    (b'{"id": "m-extra", "text": "hi", "priority": "high"}', "schema"),
    (b'{"id": "m-long-1", "text": "' + b"a" * 600 + b'"}', "too_long"),
    (b'{"id": "m-long-2", "text": "' + b"b" * 900 + b'"}', "too_long"),
    (b'{"id": "m-task", "text": "hi", "task": "dance"}', "unknown_task"),
]


def question(i: int) -> bytes:
    return orjson.dumps(
        {
            "id": f"q-{i:03d}",
            "key": f"user-{i % 7}",
            "text": f"What is {i} plus {i}?",
            "params": {"max_new_tokens": 8},
            "meta": {"n": i},
        }
    )


def settings_for(bootstrap: str, redis_url: str, tag: str) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}"},
        redis={"url": redis_url, "prefix": tag},
        limits={"max_chars": 500},
        batching={"max_batch": 16, "max_queue": 48},
        routes=[{"name": "q", "input": f"in-{tag}", "output": f"out-{tag}"}],
    )


async def run_until_written(pipeline: Pipeline, expected: int, timeout_s: float) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(pipeline.run(stop))
    deadline = time.monotonic() + timeout_s
    while pipeline.written < expected and time.monotonic() < deadline and not running.done():
        await asyncio.sleep(0.1)
    stop.set()
    await running
    assert pipeline.written == expected


def test_every_valid_event_is_answered_once_and_every_bad_one_is_dead_lettered(
    kafka_bootstrap, redis_url, worker
):
    tag = unique_name("slice")
    settings = settings_for(kafka_bootstrap, redis_url, tag)
    route = settings.routes[0]
    messages = [question(i) for i in range(VALID)] + [value for value, _ in MALFORMED]
    produce_lines(kafka_bootstrap, route.input, messages)

    asyncio.run(
        run_until_written(
            connect(settings, kafka_bootstrap, redis_url, resident(worker, settings)), len(messages), timeout_s=600
        )
    )

    answers = [orjson.loads(m.value) for m in consume_all(kafka_bootstrap, route.output, VALID, timeout_s=60)]
    assert sorted(a["id"] for a in answers) == [f"q-{i:03d}" for i in range(VALID)]
    assert all(a["output"] and 0 < a["tokens_out"] <= 8 for a in answers)
    assert all(a["meta"] == {"n": int(a["id"][2:])} and a["model"] == worker.name for a in answers)

    letters = [
        orjson.loads(m.value)
        for m in consume_all(kafka_bootstrap, settings.kafka.dead_letter_topic, len(MALFORMED), timeout_s=60)
    ]
    assert Counter(d["error"] for d in letters) == Counter(code for _, code in MALFORMED)

    counters = {
        k.decode(): int(v) for k, v in redis.Redis.from_url(redis_url).hgetall(f"{tag}:counters").items()
    }
    assert counters["events"] == len(messages)
    assert counters["answers"] == VALID
    assert counters["dead_letters"] == len(MALFORMED)
    assert counters["tokens_out"] == sum(a["tokens_out"] for a in answers)
    assert counters["dead_letters:too_long"] == 2

    assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, route.input) == end_offsets(
        kafka_bootstrap, route.input
    )
