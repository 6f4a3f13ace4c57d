"""Hostile input through the whole per-event path, not only decoding: whatever a producer sends, in any
field, at or past any limit, the message ends as exactly one record (an answer or a dead letter with
a precise code) that serializes, validates against its contract, and fits the record size limit.

Drives the real EventHandler and window stage with the model stand-in of the simulation and a writer
that records what it is handed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.config import Settings
from streamer.contracts import Answer, DeadLetter, ErrorCode
from streamer.kafka.offsets import OffsetTracker
from streamer.observe.metrics import Metrics
from streamer.outcomes import RECORD_OVERHEAD_BYTES, Outcome, Sealer
from streamer.pipeline.events import EventHandler
from streamer.pipeline.parse import RawMessage
from streamer.pipeline.window_stage import WindowStage
from tests.sim.model import SimPool

LIMIT = 16_384  # a small record limit, so the size rules bite on inputs hypothesis makes quickly
NOW_MS = 1_700_000_000_000
TOPIC = "in"


class Recorded:
    """The writer: keeps what it is handed."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


def pipeline(windowed: bool) -> tuple[EventHandler, SimPool, Recorded, asyncio.AbstractEventLoop]:
    route: dict[str, Any] = {"name": "r", "input": TOPIC, "output": "answers", "task": "answer"}
    if windowed:
        route["window"] = {"kind": "tumbling", "size_ms": 1000, "output": "windows"}
    config = Settings(kafka={"bootstrap_servers": "x:1", "dead_letter_topic": "dlq"}, routes=[route],
                      limits={"max_chars": 500, "max_record_bytes": LIMIT, "max_meta_bytes": 4096})
    tracker, writer, pool = OffsetTracker(), Recorded(), SimPool(max_queue=1000)
    sealer = Sealer(LIMIT, "dlq")
    stages = {"r": WindowStage(config.routes[0], pool, writer, tracker, None, sealer)} if windowed else {}  # type: ignore[arg-type]
    handler = EventHandler(config, pool, writer, tracker, stages, Metrics(), sealer)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    loop.run_until_complete(pool.start())
    return handler, pool, writer, loop


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                         st.text(max_size=50))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=30)


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return {"x": value}


strings = st.one_of(st.text(max_size=40), st.text(min_size=250, max_size=300), st.just(""),
                    st.just("\x01" * 3000), st.just("é" * 600), st.just("i" * 20_000))
fields = {
    "id": st.one_of(strings, json_scalars),
    "key": st.one_of(strings, st.none(), st.integers()),
    "text": st.one_of(strings, st.text(min_size=490, max_size=520), st.integers()),
    "ts": st.one_of(st.integers(-5, 2**64 + 5), st.just(NOW_MS), st.just(NOW_MS + 10**12), st.floats(),
                    st.just("2024-01-01T00:00:00Z"), st.just("yesterday"), st.none()),
    "params": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "max_new_tokens": st.integers(-2, 10_000), "temperature": st.floats(-1, 3),
        "target_lang": strings, "deadline_ms": st.integers(-1, 10**9), "surprise": st.just(1)})),
    "meta": st.one_of(st.none(), json_values, st.sampled_from([nested(31), nested(40), nested(300)]),
                      st.just({"blob": "b" * 5000}), st.just({"ctrl": "\x02" * 1000})),
    "task": st.one_of(st.none(), st.sampled_from(["answer", "translate", "classify", "none", "dance"])),
}


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes | None, bytes | None]:
    """(value, Kafka key): a JSON object with some fields drawn, or bytes that are not one."""
    kind = draw(st.sampled_from(["object", "object", "object", "bytes", "flood"]))
    key = draw(st.one_of(st.none(), st.binary(max_size=20), st.just(b"k" * 5000)))
    if kind == "bytes":
        return draw(st.one_of(st.none(), st.binary(max_size=200))), key
    if kind == "flood":
        return draw(st.sampled_from([b"\x01", b"\x00", b'"', b"\xff"])) * draw(st.integers(1, 40_000)), key
    doc = {name: draw(strategy) for name, strategy in fields.items() if draw(st.booleans())}
    if draw(st.booleans()):
        doc.setdefault("id", "e")
        doc.setdefault("text", "hello")
    try:
        return orjson.dumps(doc), key
    except TypeError:  # integers past 64 bits: send what a careless producer would, the text of it
        return repr(doc).encode(), key


def records_of(outcomes: list[Outcome], offset: int) -> Iterator[Outcome]:
    return (o for o in outcomes if any(ref.offset == offset for ref in o.releases))


@pytest.mark.parametrize("windowed", [False, True])
@settings(max_examples=150)
@given(st.lists(messages(), min_size=1, max_size=8))
def test_every_message_ends_as_exactly_one_record_that_fits(windowed: bool, batch) -> None:
    handler, pool, writer, loop = pipeline(windowed)
    try:
        for offset, (value, key) in enumerate(batch):
            raw = RawMessage(value, key, NOW_MS, TOPIC, 0, offset)
            loop.run_until_complete(_call(lambda raw=raw: handler.accept(raw, NOW_MS)))
        while pool.pending:
            pool.finish(0, ok=True)
            loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    for offset in range(len(batch)):
        own = [o for o in records_of(writer.outcomes, offset) if not _late(o)]
        assert len(own) == 1, f"message {offset} ended as {len(own)} records: {[o.record for o in own]}"
        outcome = own[0]
        assert len(outcome.payload) + len(outcome.kafka_key or b"") + RECORD_OVERHEAD_BYTES <= LIMIT
        model = Answer if outcome.topic == "answers" else DeadLetter
        assert model.model_validate_json(outcome.payload) == outcome.record
        if isinstance(outcome.record, DeadLetter):
            assert outcome.record.error in set(ErrorCode)


def _late(outcome: Outcome) -> bool:
    return isinstance(outcome.record, DeadLetter) and outcome.record.error is ErrorCode.LATE


async def _call(action: Any) -> None:
    action()


def test_a_dead_letter_of_control_characters_is_cut_to_fit_after_escaping() -> None:
    """Review finding 2: 170 KiB of \\x01 (invalid JSON) made a 1,044,737-byte dead letter, over
    librdkafka's message.max.bytes: produce() refused it, and the writer died (or, exactly once, redid
    the transaction for ever)."""
    handler, _, writer, loop = pipeline(windowed=False)
    try:
        loop.run_until_complete(_call(lambda: handler.accept(RawMessage(b"\x01" * 174_080, b"k", NOW_MS, TOPIC, 0, 0),
                                                             NOW_MS)))
    finally:
        loop.close()
    (outcome,) = writer.outcomes
    letter = outcome.record
    assert isinstance(letter, DeadLetter) and letter.error is ErrorCode.INVALID_JSON and letter.payload_truncated
    assert len(outcome.payload) <= LIMIT - RECORD_OVERHEAD_BYTES and letter.payload == "\x01" * len(letter.payload)


def test_an_event_far_in_the_future_is_a_dead_letter_of_its_own_and_moves_no_watermark() -> None:
    """Review finding 3: one event from a producer whose clock is a day ahead (or with `ts` in
    microseconds, now past the contract's year 9999) made every later event of its partition late, and
    its window pinned the partition's commit point for ever."""
    handler, _, writer, loop = pipeline(windowed=True)
    try:
        for offset, ts in enumerate([NOW_MS + 86_400_000, NOW_MS - 5_000, NOW_MS - 4_000]):
            raw = RawMessage(orjson.dumps({"id": f"e{offset}", "text": "t", "ts": ts}), None, NOW_MS, TOPIC, 0, offset)
            loop.run_until_complete(_call(lambda raw=raw: handler.accept(raw, NOW_MS)))
    finally:
        loop.close()
    codes = [o.record.error for o in writer.outcomes if isinstance(o.record, DeadLetter)]
    assert codes == [ErrorCode.FUTURE], "the later events are not late"
