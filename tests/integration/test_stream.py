"""Answers that stream out, against a real broker, a real redis-server and the real model: a reader blocked
in XREAD sees each answer's pieces before the answer is in Redis or on its topic, the pieces join to the
answer, and the delta records on the partial topic count up to one final marker per answered event."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import orjson
import pytest
import redis

from streamer.config import Settings
from streamer.engine.build import resident
from streamer.pipeline.app import Pipeline, connect
from tests.integration.services import consume_all, produce_lines, unique_name

pytestmark = pytest.mark.integration

QUESTIONS = ["What is Kafka?", "Why is the sky blue?", "Name three rivers in Europe.",
             "How does a bicycle stay upright?", "What is a stream processor?", "Describe Paris in two sentences."]


@dataclass
class Seen:
    """What the reader saw, with its clock (time.time(), as Kafka's record timestamps)."""

    pieces: dict[str, list[tuple[float, int, str, bool]]] = field(default_factory=lambda: defaultdict(list))
    answers: dict[str, tuple[float, str]] = field(default_factory=dict)
    answered_when_first_piece_came: dict[str, bool] = field(default_factory=dict)


def read(url: str, prefix: str, ids: list[str], seen: Seen, stop: threading.Event) -> None:
    """XREAD BLOCK on every event's partial stream and on the answers stream at once, as a dashboard would;
    at an event's first piece, ask Redis whether its answer is there yet."""
    client = redis.Redis.from_url(url)
    cursors = {f"{prefix}:partial:q:{i}": "0-0" for i in ids} | {f"{prefix}:answers": "0-0"}  # route q
    def finished() -> bool:  # every answer, and every final marker (which may come just after its answer)
        return all(i in seen.answers and seen.pieces[i] and seen.pieces[i][-1][3] for i in ids)

    while not stop.is_set() and not finished():
        for name, entries in client.xread(cursors, block=200) or []:
            name = name.decode()
            for entry_id, fields in entries:
                cursors[name] = entry_id.decode()
                now = time.time()
                if name.endswith(":answers"):
                    answer = orjson.loads(fields[b"answer"])
                    seen.answers[answer["id"]] = (now, answer["output"])
                    continue
                event = name.rsplit(":", 1)[1]
                if not seen.pieces[event]:
                    seen.answered_when_first_piece_came[event] = bool(client.exists(f"{prefix}:answer:{event}"))
                seen.pieces[event].append((now, int(fields[b"seq"]), fields[b"delta"].decode(),
                                           fields[b"final"] == b"1"))
    client.close()


async def serve(pipeline: Pipeline, ready: asyncio.Event, done: asyncio.Event, expected: int) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(pipeline.run(stop))
    while pipeline.written < 1 and not running.done():  # the warm-up question: group joined, model warm
        await asyncio.sleep(0.05)
    ready.set()
    deadline = time.monotonic() + 120
    while pipeline.written < expected and time.monotonic() < deadline and not running.done():
        await asyncio.sleep(0.05)
    done.set()
    stop.set()
    await running


def test_a_reader_sees_answers_typing_before_they_are_final(kafka_bootstrap, redis_url, worker, capsys):
    tag = unique_name("stream")
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}"},
        redis={"url": redis_url, "prefix": tag},
        partials={"flush_ms": 20},
        routes=[{"name": "q", "input": f"in-{tag}", "output": f"out-{tag}", "max_new_tokens": 48,
                 "stream": True, "partial_output": f"partial-{tag}"}],
    )
    route = settings.routes[0]
    ids = [f"s-{i}" for i in range(len(QUESTIONS))]
    produce_lines(kafka_bootstrap, route.input, [orjson.dumps({"id": "warm-up", "key": "w", "text": "Hi."})])
    seen, stop = Seen(), threading.Event()
    produced_at: float = 0.0

    async def scenario() -> None:
        nonlocal produced_at
        ready, done = asyncio.Event(), asyncio.Event()
        pipeline = connect(settings, kafka_bootstrap, redis_url, resident(worker, settings))
        serving = asyncio.create_task(serve(pipeline, ready, done, 1 + len(ids)))
        await ready.wait()
        reader = asyncio.create_task(asyncio.to_thread(read, redis_url, tag, ids, seen, stop))
        produced_at = time.time()
        await asyncio.to_thread(produce_lines, kafka_bootstrap, route.input,
                                [orjson.dumps({"id": i, "key": f"user-{n}", "text": q})
                                 for n, (i, q) in enumerate(zip(ids, QUESTIONS, strict=True))],
                                [f"user-{n}".encode() for n in range(len(ids))])
        try:
            await done.wait()
            await asyncio.wait_for(reader, 10)
        finally:
            stop.set()
            await serving

    asyncio.run(scenario())

    outputs = {orjson.loads(r.value)["id"]: r for r in consume_all(kafka_bootstrap, route.output, 1 + len(ids))}
    assert set(seen.answers) >= set(ids)
    rows = []
    for event in ids:
        pieces = seen.pieces[event]
        first_s, answer_s = pieces[0][0], seen.answers[event][0]
        assert seen.answered_when_first_piece_came[event] is False, f"{event}: its answer was in Redis first"
        assert first_s < answer_s  # the answers stream too
        assert first_s * 1000 < outputs[event].timestamp_ms  # before its answer was even produced to Kafka
        assert [seq for _, seq, _, _ in pieces] == list(range(len(pieces)))
        assert [final for *_, final in pieces] == [False] * (len(pieces) - 1) + [True]
        assert "".join(delta for _, _, delta, _ in pieces).strip() == seen.answers[event][1]
        rows.append((event, len(pieces), first_s - produced_at, answer_s - produced_at))

    deltas = defaultdict(list)
    for record in consume_all(kafka_bootstrap, route.partial_output, 10_000, timeout_s=5):
        delta = orjson.loads(record.value)
        deltas[delta["id"]].append(delta)
        assert record.key == (delta["key"] or "").encode()
    for event in ids:
        mine = sorted(deltas[event], key=lambda d: d["seq"])
        assert [d["seq"] for d in mine] == list(range(len(mine)))  # one partition per key: in order, no gap
        assert [d["final"] for d in mine].count(True) == 1 and mine[-1]["final"]
        assert "".join(d["delta"] for d in mine).strip() == orjson.loads(outputs[event].value)["output"]

    with capsys.disabled():
        print("\nevent  deltas  first piece (s)  final answer in Redis (s)   [from produce, same run]")
        for event, n, first, final in rows:
            print(f"{event:6} {n:6}  {first:15.3f}  {final:25.3f}")
