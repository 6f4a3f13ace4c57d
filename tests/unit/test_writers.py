"""The writers on the real sinks over the simulation's stand-in Kafka and Redis, on virtual time: a record
refused for what it is becomes its dead letter instead of being produced for ever; an exactly-once cycle
never holds the consumer unpolled for longer than its budget; an at-least-once session result waits for
the commit point, so a replay can never rebuild part of it under another id."""

from __future__ import annotations

import pytest

from streamer.contracts import DeadLetter, ErrorCode, Source, WindowBounds, WindowResult
from streamer.kafka.offsets import OffsetTracker, Position
from streamer.outcomes import Outcome, Sealer
from streamer.pipeline.sinks.kafka import KafkaRecords, KafkaTransaction
from streamer.pipeline.sinks.redis import RedisOutcomes
from streamer.pipeline.writer import CYCLE_BUDGET_S, TransactionalWriter, Writer
from tests.sim.kafka import Cluster, Membership, SimProducer, SimSink
from tests.sim.loop import VirtualLoop
from tests.sim.state import SimState

TP = ("in", 0)
SEALER = Sealer(1_000_000, "dlq")


def kafka_then_redis(sink: SimSink, state: SimState, tracker: OffsetTracker) -> Writer:
    """The pipeline's order: Kafka acknowledges, then Redis."""
    return Writer([KafkaRecords(sink, SEALER), RedisOutcomes(state)], tracker)


def redis_then_transaction(producer: SimProducer, state: SimState, tracker: OffsetTracker, cluster: Cluster,
                 interval_s: float) -> TransactionalWriter:
    """The pipeline's order: Redis fenced, then one Kafka transaction."""
    return TransactionalWriter([RedisOutcomes(state)], KafkaTransaction(producer, SEALER), tracker, interval_s,
                               lambda: Membership(cluster.generation))


def letter(offset: int) -> DeadLetter:
    return DeadLetter(error=ErrorCode.SCHEMA, detail="d", payload="x", payload_encoding="utf-8",
                      source=Source(topic=TP[0], partition=TP[1], offset=offset), ts=0)


def session(key: str, start_ms: int) -> WindowResult:
    return WindowResult(id=f"s-{key}", route="r", key=key, window=WindowBounds(kind="session", start=start_ms,
                        end=start_ms + 10), count=1, first_ts=start_ms, last_ts=start_ms, late=0, final=True,
                        emitted_at=0)


def test_a_record_the_broker_refuses_for_its_size_is_replaced_by_its_dead_letter(loop: VirtualLoop) -> None:
    """Review finding 2, at least once: the writer produced a refused record again every 5 s for ever, and
    every partition and route waited behind it."""
    cluster = Cluster(TP[0], 1, max_record_bytes=2_000, max_poll_interval_s=300)
    sink, tracker = SimSink(cluster), OffsetTracker()
    ref = tracker.track(TP, 0)
    writer = kafka_then_redis(sink, SimState(), tracker)
    big = DeadLetter(error=ErrorCode.SCHEMA, detail="d", payload="p" * 5_000, payload_encoding="utf-8",
                     source=Source(topic=TP[0], partition=0, offset=0), ts=0)
    writer.add(SEALER.seal("dlq", None, big, (ref,), "r"))  # fits the writer's limit, not this broker's
    loop.create_task(writer.run())
    loop.settle()
    sink.deliver(10)
    loop.settle()
    (written,) = cluster.out
    assert b'"payload":""' in written.value and b'"payload_truncated":true' in written.value
    assert tracker.commit_points() == {TP: 1}


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_a_window_result_the_broker_refuses_becomes_a_dead_letter_and_the_writer_goes_on(
        loop: VirtualLoop, exactly_once: bool) -> None:
    """Adversarial review, finding 1: the dead letter standing for a refused window result has no source
    event; writing it killed the writer, on every restart. Now it is written, finishes the window's
    events, and keeps the result's ordering rule (a session's stays in order)."""
    cluster = Cluster(TP[0], 1, max_record_bytes=2_000, max_poll_interval_s=300)
    tracker, state = OffsetTracker(), SimState()
    refs = tuple(tracker.track(TP, offset) for offset in range(3))
    result = session("k", 0).model_copy(update={"summary": "s" * 5_000})
    outcome = SEALER.seal("windows", b"s-k", result, refs, "r", in_order=True)
    assert SEALER.replacement(result, ErrorCode.TOO_LARGE, "refused", refs, "r", in_order=True).in_order
    if exactly_once:
        producer = SimProducer(cluster)
        writer: Writer | TransactionalWriter = redis_then_transaction(producer, state, tracker, cluster, 0.05)
    else:
        sink = SimSink(cluster)
        writer = kafka_then_redis(sink, state, tracker)
    writer.add(outcome)
    task = loop.create_task(writer.run())
    for _ in range(20):
        loop.settle()
        producer.end() if exactly_once else sink.deliver(10)
        loop.advance(0.1)
    assert not task.done(), task.exception() if task.done() else None
    (written,) = cluster.out
    assert written.topic == "dlq" and b'"error":"too_large"' in written.value
    assert state.counters["dead_letters:too_large"] == 1 and state.counters["events"] == 0
    assert tracker.commit_points() == {TP: 3}


def test_an_exactly_once_cycle_gives_up_on_an_absent_redis_within_its_budget(loop: VirtualLoop) -> None:
    """Review finding 6: a cycle retried Redis for ever without polling the consumer; past
    max.poll.interval.ms the member left the group and every later transaction failed, for ever."""
    cluster, state, tracker = Cluster(TP[0], 1, 1_000_000, 300), SimState(), OffsetTracker()
    state.up = False
    producer = SimProducer(cluster)
    writer = redis_then_transaction(producer, state, tracker, cluster, 0.1)
    writer.add(SEALER.seal("dlq", None, letter(0), (tracker.track(TP, 0),), "r"))
    loop.create_task(writer.run())
    busy_s, longest_s, pauses = 0.0, 0.0, 0
    for _ in range(2_000):  # 100 s, sampled every 50 ms
        loop.advance(0.05)
        busy_s = busy_s + 0.05 if writer.busy else 0.0
        pauses += not writer.busy
        longest_s = max(longest_s, busy_s)
    assert CYCLE_BUDGET_S - 6 <= longest_s <= CYCLE_BUDGET_S + 0.5 and pauses, "the consumer is polled between tries"
    assert writer.outage and writer.held + writer.backlog == 1, "kept for the next cycle"
    state.up = True
    loop.advance(1)
    producer.end()
    loop.advance(0.5)
    assert cluster.committed == {TP: 1} and len(cluster.out) == 1


def test_at_least_once_a_session_is_written_only_once_every_event_before_its_own_is(loop: VirtualLoop) -> None:
    """Review finding 9: key A's session (offsets 0, 2) was written while key B's session (offset 1) was
    open; a crash then replayed from offset 1 and rebuilt A from offset 2 alone, under another id: a
    partial duplicate no consumer could recognise. Now A waits, and commits stay below it."""
    cluster = Cluster(TP[0], 1, 1_000_000, 300)
    sink, tracker = SimSink(cluster), OffsetTracker()
    refs = [tracker.track(TP, offset) for offset in range(3)]
    writer = kafka_then_redis(sink, SimState(), tracker)
    loop.create_task(writer.run())
    writer.add(SEALER.seal("w", b"A", session("A", 0), (refs[0], refs[2]), "r", in_order=True))
    loop.advance(0.2)
    sink.deliver(10)
    loop.advance(0.2)
    assert cluster.out == [] and writer.limits() == {TP: 0}
    assert tracker.positions(writer.limits()) == {TP: Position(0)}, "no commit passes A's first event"
    writer.add(SEALER.seal("w", b"B", session("B", 5), (refs[1],), "r", in_order=True))
    loop.advance(0.2)
    sink.deliver(10)
    loop.advance(0.2)
    assert sorted(o.key for o in cluster.out) == [b"A", b"B"] and writer.limits() == {}
    assert tracker.positions(writer.limits()) == {TP: Position(3)}


def test_an_outcome_held_in_order_of_a_revoked_partition_is_dropped(loop: VirtualLoop) -> None:
    tracker = OffsetTracker()
    writer = kafka_then_redis(SimSink(Cluster(TP[0], 1, 1_000_000, 300)), SimState(), tracker)
    outcome: Outcome = SEALER.seal("w", b"A", session("A", 0), (tracker.track(TP, 0),), "r", in_order=True)
    writer.add(outcome)
    writer.forget([TP])
    assert writer.held == 0 and writer.limits() == {}
