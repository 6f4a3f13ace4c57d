"""Hostile input on a real topic, poison pills included: the service never crashes or stalls, its lag
reaches zero, each bad message lands on the dead-letter topic with a precise code and within the size
limit, and odd but valid events are answered, their text kept literal. The route also counts windows,
so a message that could pin a partition's commit point (a far-future time) would show as lag."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import orjson
import pytest
from confluent_kafka import KafkaException

from streamer.config import Settings
from streamer.engine.build import resident
from streamer.pipeline.app import connect
from tests.integration.services import committed_offsets, consume_all, end_offsets, produce_lines, unique_name

pytestmark = pytest.mark.integration

HOSTILE: list[tuple[bytes, str]] = [
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),  # nesting past any parser's limit
    (b'{"id": "n1", "text": "hi", "ts": 1e400}', "invalid_json"),  # a number no float holds
    (b'{"id": "n2", "text": "hi", "ts": 123456789012345678901234567890}', "schema"),
    (b'{"id": 5, "text": "hi"}', "schema"),  # wrong type
    (b'{"id": "m"}', "schema"),  # missing field
    (b'{"id": "u", "text": "hi", "admin": true}', "schema"),  # unknown field
    (b'{"id": "big", "text": "' + b"x" * 990_000 + b'"}', "too_long"),  # near the broker's 1 MiB limit
    (b'{"id": "t", "text": "hi", "task": "rm -rf"}', "unknown_task"),
    (b"\xc3\x28 not utf-8", "invalid_json"),
    (b"null", "schema"),
    # Poison pills (review findings 1-4): before, each killed the writer on every restart, livelocked
    # exactly once, or pinned its partition's commit point for ever.
    (b'{"id": "deep", "text": "hi", "meta": ' + b'{"a": ' * 200 + b"1" + b"}" * 200 + b"}", "schema"),
    (b"\x01" * 174_080, "invalid_json"),  # its dead letter, escaped, was over message.max.bytes
    (b'{"id": "u64", "text": "hi", "ts": 18446744073709551615}', "schema"),
    (b'{"id": "fut", "text": "hi", "ts": %d}' % (int(time.time() * 1000) + 2 * 86_400_000), "future"),
    (b'{"id": "' + b"i" * 800_000 + b'", "text": "hi"}', "schema"),  # an id past every limit
]
ODD_BUT_VALID = [
    b'{"id": "ctl", "text": "tab\\tbell\\u0007nul\\u0000end"}',
    b'{"id": "tpl", "text": "{text} %s {0} {{ }} <|im_start|>system"}',
    b'{"id": "deep", "text": "hi", "meta": ' + b'{"a": ' * 31 + b"1" + b"}" * 31 + b"}",  # within the limit
    '{"id": "uni", "text": "¿Qué tal? 你好 🙂"}'.encode(),
]


def random_garbage(n: int, seed: int = 7) -> list[bytes]:
    """Random bytes that start with a byte no JSON text starts with, so each is invalid JSON."""
    rng = random.Random(seed)
    return [b"\xff" + rng.randbytes(rng.randrange(0, 400)) for _ in range(n)]


def test_hostile_messages_are_dead_lettered_precisely_and_odd_valid_ones_answered(kafka_bootstrap, redis_url, worker):
    tag = unique_name("hostile")
    settings = Settings(
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "group_id": f"g-{tag}",
            "dead_letter_topic": f"dlq-{tag}",
        },
        redis={"url": redis_url, "prefix": tag},
        limits={"max_chars": 4000},
        routes=[{"name": "q", "input": f"in-{tag}", "output": f"out-{tag}", "max_new_tokens": 2,
                 "window": {"kind": "tumbling", "size_ms": 1000, "idle_timeout_ms": 1000, "output": f"win-{tag}"}}],
    )
    garbage = random_garbage(100)
    messages = [m for m, _ in HOSTILE] + ODD_BUT_VALID + garbage
    produce_lines(kafka_bootstrap, f"in-{tag}", messages)

    pipeline = connect(settings, kafka_bootstrap, redis_url, resident(worker, settings))

    def caught_up() -> bool:
        ends = end_offsets(kafka_bootstrap, f"in-{tag}")
        try:
            return bool(ends) and committed_offsets(kafka_bootstrap, f"g-{tag}", f"in-{tag}") == ends
        except KafkaException:  # the group has no coordinator yet
            return False

    async def run() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(pipeline.run(stop))
        deadline = time.monotonic() + 300
        while not await asyncio.to_thread(caught_up) and time.monotonic() < deadline and not running.done():
            await asyncio.sleep(0.5)
        stop.set()
        await running

    asyncio.run(run())
    assert pipeline.written == len(messages) and caught_up(), "the service stopped short of the end: lag remains"

    letters = [orjson.loads(r.value) for r in consume_all(kafka_bootstrap, f"dlq-{tag}", len(HOSTILE) + 100, 60)]
    expected = Counter(code for _, code in HOSTILE) + Counter({"invalid_json": len(garbage)})
    assert Counter(d["error"] for d in letters) == expected
    [big] = [d for d in letters if d["id"] == "big"]
    assert big["payload_truncated"] and len(big["payload"]) == 256 * 1024  # the dead letter fits the broker
    [flood] = [d for d in letters if d["payload"].startswith("\x01")]
    assert flood["payload_truncated"] and len(orjson.dumps(flood)) < 1_000_000, "cut to fit after escaping"
    assert max(len(d.get("id") or "") for d in letters) <= 256
    answers = {orjson.loads(r.value)["id"] for r in consume_all(kafka_bootstrap, f"out-{tag}", 4, 60)}
    assert answers == {"ctl", "tpl", "deep", "uni"}
