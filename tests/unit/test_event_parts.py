"""The event handler's parts in the offset ledger, path by path: an event's offset may be committed only
once every outcome it has is written (review guideline 4). A real OffsetTracker and window stage, the
simulation's model stand-in, and a writer that records what it is handed."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from streamer.config import Settings
from streamer.contracts import Answer, DeadLetter, ErrorCode
from streamer.kafka.offsets import OffsetTracker
from streamer.observe.metrics import Metrics
from streamer.outcomes import Outcome, Sealer
from streamer.pipeline.events import EventHandler
from streamer.pipeline.parse import RawMessage
from streamer.pipeline.window_stage import WindowStage
from tests.sim.model import SimPool

TP = ("in", 0)
NOW_MS = 1_700_000_000_000


class Recorded:
    def __init__(self) -> None:
        self.added: list[Outcome] = []

    def add(self, outcome: Outcome) -> None:
        self.added.append(outcome)


class Handler:
    """One route's handler, its ledger and its writer, on an event loop of its own."""

    def __init__(self, **route: Any) -> None:
        config = Settings(kafka={"bootstrap_servers": "x:1", "dead_letter_topic": "dlq"},
                          routes=[{"name": "r", "input": TP[0], **route}])
        self.tracker, self.writer, self.pool = OffsetTracker(), Recorded(), SimPool(max_queue=100)
        sealer = Sealer(1_000_000, "dlq")
        r = config.routes[0]
        stages = {"r": WindowStage(r, self.pool, self.writer, self.tracker, None, sealer)} if r.window else {}  # type: ignore[arg-type]
        self.stages = stages
        self.metrics = Metrics()
        self.handler = EventHandler(config, self.pool, self.writer, self.tracker, stages, self.metrics, sealer)  # type: ignore[arg-type]
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.pool.start())
        for stage in stages.values():
            stage.assign([TP])

    def accept(self, offset: int, ts_ms: int, now_ms: int = NOW_MS, record_ms: int | None = None,
               **fields: Any) -> None:
        value = orjson.dumps({"id": f"e{offset}", "text": "hello", "key": "k", "ts": ts_ms, **fields})
        stamp = now_ms if record_ms is None else record_ms

        async def accept() -> None:
            self.handler.accept(RawMessage(value, b"k", stamp, TP[0], TP[1], offset), now_ms)

        self.loop.run_until_complete(accept())

    def write(self, outcome: Outcome) -> None:
        """What the writer does once an outcome is in Kafka and Redis."""
        for ref in outcome.releases:
            self.tracker.done(ref)

    def settle(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))

    def point(self) -> int:
        return self.tracker.commit_points()[TP]


def window(**fields: Any) -> dict[str, Any]:
    return {"kind": "tumbling", "size_ms": 1000, "output": "windows", **fields}


def test_a_late_event_on_a_window_only_route_stays_in_flight_until_its_late_record_is_written():
    """Review finding 8: on a `task: none` route a late event's only part was released at once, so the
    commit point passed it before its late dead letter was written; a crash then lost the record."""
    h = Handler(task="none", window=window())
    h.accept(0, ts_ms=5_000)  # opens [5000, 6000)
    h.accept(1, ts_ms=10)  # behind the partition's watermark (5000): late
    (late,) = h.writer.added
    assert isinstance(late.record, DeadLetter) and late.record.error is ErrorCode.LATE
    assert h.tracker.in_flight(TP) == 2, "the late event waits for its record"
    h.write(late)
    assert h.tracker.in_flight(TP) == 1 and h.point() == 0, "offset 0's window is still open"


def test_an_answered_event_inside_a_window_waits_for_its_answer_and_its_window():
    h = Handler(task="answer", output="answers", window=window())
    h.accept(0, ts_ms=5_000)
    h.pool.finish(0, ok=True)
    h.settle()
    (answer,) = h.writer.added
    assert isinstance(answer.record, Answer)
    h.write(answer)
    assert h.tracker.in_flight(TP) == 1, "the window still holds it"


def test_a_failed_model_request_is_a_model_error_dead_letter_that_finishes_the_event():
    h = Handler(task="answer", output="answers")
    h.accept(0, ts_ms=5_000)
    h.pool.finish(0, ok=False)
    h.settle()
    (letter,) = h.writer.added
    assert isinstance(letter.record, DeadLetter) and letter.record.error is ErrorCode.MODEL_ERROR
    h.write(letter)
    assert h.point() == 1


def test_a_cancelled_model_request_still_ends_in_one_dead_letter_and_resolves_its_label():
    """Review finding 23: the done-callback caught Exception only, so a cancelled future (a BaseException)
    left the event with no outcome and its classify label unresolved: its window waited until shutdown
    and the commit point stayed at it."""
    h = Handler(task="classify", labels=["pos", "neg"], output="answers", window=window())
    h.accept(0, ts_ms=5_000)
    request = h.pool.pending.pop(0)
    request.future.cancel()
    h.settle()
    (letter,) = h.writer.added
    assert isinstance(letter.record, DeadLetter) and letter.record.error is ErrorCode.MODEL_ERROR
    slots = [slot for stage in h.stages.values() for e in stage._engines.values()
             for w in e.peek("k") for slot in w.state.slots]
    assert slots == [], "the window no longer waits for the label"


def test_a_producer_cannot_jump_the_queue_with_its_own_deadline_unless_the_route_trusts_it():
    """Review finding 24: `params.deadline_ms: 1` put any producer's event first in admission order."""
    from streamer.pipeline.events import _deadline_ms

    untrusted = Settings(routes=[{"name": "r", "input": "in", "output": "o", "slo_ms": 2_000}]).routes[0]
    trusted = Settings(routes=[{"name": "r", "input": "in", "output": "o", "slo_ms": 2_000,
                                "event_deadlines": True}]).routes[0]
    from streamer.contracts import InputEvent

    event = InputEvent.model_validate({"id": "a", "text": "t", "params": {"deadline_ms": 1}})
    assert _deadline_ms(event, untrusted) == 2_000
    assert _deadline_ms(event, trusted) == 1


def test_an_event_is_judged_future_alike_when_its_record_is_replayed_later():
    """Adversarial review, finding 2: `ts` was judged against processing time where the record's own
    timestamp was ahead of it, so an event judged `future` could be accepted by a replay minutes later,
    move the watermark an hour ahead and turn events already counted in windows late. Its `ts` is now
    judged against the record's timestamp (which a Kafka >= 4.0 broker keeps within an hour of its clock)."""
    hour_ms = 3_600_000
    record_ms = NOW_MS + 50 * 60_000  # a producer clock 50 minutes fast: within what the broker accepts
    for ts_ms, expected in ((record_ms + hour_ms + 1, [ErrorCode.FUTURE]), (NOW_MS + hour_ms + 60_000, [])):
        codes = []
        for now_ms in (NOW_MS, NOW_MS + 2 * 60_000):  # the first run, and a replay two minutes later
            h = Handler(task="none", window=window())
            h.accept(0, ts_ms=ts_ms, now_ms=now_ms, record_ms=record_ms)
            h.settle()
            codes.append([o.record.error for o in h.writer.added if isinstance(o.record, DeadLetter)])
        assert codes == [expected, expected]


def test_a_record_whose_own_timestamp_is_beyond_the_skew_is_future():
    """A broker that lets a producer's clock run ahead (message.timestamp.after.max.ms raised): the record's
    timestamp, the event time when `ts` is absent, is judged against processing time."""
    h = Handler(task="none", window=window())
    h.accept(0, ts_ms=NOW_MS + 2 * 3_600_000, record_ms=NOW_MS + 2 * 3_600_000)
    h.settle()
    assert [o.record.error for o in h.writer.added] == [ErrorCode.FUTURE]


def test_events_in_counts_the_events_of_a_poll_at_its_flush():
    h = Handler(task="none", window=window())
    for offset in range(3):
        h.accept(offset, ts_ms=5_000 + offset)

    def counted() -> float:
        return h.metrics.registry.get_sample_value("streamer_events_in_total", {"route": "r"}) or 0

    assert counted() == 0  # counted per poll, not per event
    h.handler.flush()
    assert counted() == 3
    h.handler.flush()
    assert counted() == 3
