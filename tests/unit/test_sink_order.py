"""The writers' composition over their sinks, as a specification (streamer/pipeline/sinks, writer.py).

At least once, a `Writer` writes its sinks in order, each only once the one before took the whole batch,
and an event is fully written (its part released, its offset committable) only once the last took it: the
pipeline's Kafka records are all acknowledged before Redis applies any of their state. A sink that fails
releases nothing. Exactly once, a `TransactionalWriter` applies its fenced sinks (Redis) first, within
the cycle's budget, and only then opens its one transaction, which commits the records with the offsets.

Recording sinks show the order on its own; the real sinks over the simulation's Kafka and Redis show the
pipeline's pair keeping it.
"""

from __future__ import annotations

import asyncio

import pytest

from streamer.contracts import DeadLetter, ErrorCode, Source
from streamer.kafka.offsets import TP, OffsetTracker, Ref
from streamer.outcomes import Outcome, Sealer
from streamer.pipeline.sinks import FencedSink, Sink
from streamer.pipeline.sinks.kafka import KafkaRecords, KafkaTransaction
from streamer.pipeline.sinks.redis import RedisOutcomes
from streamer.pipeline.writer import TransactionalWriter, Writer
from tests.sim.kafka import Cluster, Membership, SimProducer, SimSink
from tests.sim.loop import VirtualLoop
from tests.sim.state import SimState

IN: TP = ("in", 0)
SEALER = Sealer(1_000_000, "dlq")


def letter(ref: Ref, payload: str = "x") -> Outcome:
    """A dead letter finishing one event (the smallest outcome Kafka and Redis both take)."""
    record = DeadLetter(error=ErrorCode.SCHEMA, detail="d", payload=payload, payload_encoding="utf-8",
                        source=Source(topic=ref.tp[0], partition=ref.tp[1], offset=ref.offset), ts=0)
    return SEALER.seal("dlq", None, record, (ref,), "r")


class Recording:
    """A `Sink` that notes what it is given and takes it only when the test opens its gate (or fails it)."""

    def __init__(self, name: str, journal: list[str]) -> None:
        self.name, self.journal = name, journal
        self.gate: asyncio.Future[None] | None = None
        self.outage = False
        self.seen: list[list[Outcome]] = []

    async def write(self, batch: list[Outcome]) -> list[Outcome]:
        self.journal.append(f"{self.name} given {len(batch)}")
        self.seen.append(batch)
        self.gate = asyncio.get_running_loop().create_future()
        await self.gate
        self.journal.append(f"{self.name} took {len(batch)}")
        return batch


def at_least_once(sinks: list[Sink]) -> tuple[Writer, list[Ref], OffsetTracker]:
    tracker = OffsetTracker()
    refs = [tracker.track(IN, offset) for offset in range(3)]
    return Writer(sinks, tracker), refs, tracker


def test_at_least_once_each_sink_takes_the_whole_batch_before_the_next_sees_it(loop: VirtualLoop) -> None:
    journal: list[str] = []
    kafka, redis = Recording("kafka", journal), Recording("redis", journal)
    writer, refs, tracker = at_least_once([kafka, redis])
    for ref in refs:
        writer.add(letter(ref))
    loop.create_task(writer.run())
    loop.settle()
    assert journal == ["kafka given 3"]
    assert kafka.gate is not None
    kafka.gate.set_result(None)
    loop.settle()
    assert journal == ["kafka given 3", "kafka took 3", "redis given 3"]
    assert tracker.commit_points() == {IN: 0}, "nothing is fully written while a sink still writes"
    assert redis.gate is not None
    redis.gate.set_result(None)
    loop.settle()
    assert journal[-1] == "redis took 3"
    assert tracker.commit_points() == {IN: 3}, "released once the last sink took the batch"
    assert writer.written == 3


def test_at_least_once_a_failing_second_sink_releases_nothing(loop: VirtualLoop) -> None:
    """An error a sink does not wait out stops the writer (the pipeline then stops with it); what the first
    sink wrote is repeated after the restart, which is what at least once allows."""
    journal: list[str] = []
    kafka, redis = Recording("kafka", journal), Recording("redis", journal)
    writer, refs, tracker = at_least_once([kafka, redis])
    writer.add(letter(refs[0]))
    task = loop.create_task(writer.run())
    loop.settle()
    assert kafka.gate is not None
    kafka.gate.set_result(None)
    loop.settle()
    assert redis.gate is not None
    redis.gate.set_exception(RuntimeError("redis said no"))
    loop.settle()
    assert task.done() and isinstance(task.exception(), RuntimeError)
    assert tracker.commit_points() == {IN: 0} and writer.written == 0


def test_at_least_once_a_record_the_first_sink_replaces_is_what_the_next_sink_writes(loop: VirtualLoop) -> None:
    """Kafka refused the record for its size: Redis gets (and counts) the dead letter that took its place."""
    journal: list[str] = []
    cluster = Cluster(IN[0], 1, max_record_bytes=2_000, max_poll_interval_s=300)
    sink, redis = SimSink(cluster), Recording("redis", journal)
    writer, refs, _ = at_least_once([KafkaRecords(sink, SEALER), redis])
    writer.add(letter(refs[0], payload="p" * 5_000))
    loop.create_task(writer.run())
    loop.settle()
    sink.deliver(10)
    loop.settle()
    ((replaced,),) = redis.seen
    assert isinstance(replaced.record, DeadLetter) and replaced.record.payload_truncated
    assert replaced.releases == (refs[0],)


def test_at_least_once_every_kafka_record_is_acknowledged_before_redis_applies_any(loop: VirtualLoop) -> None:
    """The pipeline's pair: state in Redis that says "written" always has its record on the topic."""
    cluster, state = Cluster(IN[0], 1, 1_000_000, 300), SimState()
    sink = SimSink(cluster)
    writer, refs, tracker = at_least_once([KafkaRecords(sink, SEALER), RedisOutcomes(state)])
    for ref in refs:
        writer.add(letter(ref))
    loop.create_task(writer.run())
    loop.settle()
    sink.deliver(2)
    loop.settle()
    assert len(cluster.out) == 2 and state.counters["events"] == 0 and tracker.commit_points() == {IN: 0}
    sink.deliver(1)
    loop.settle()
    assert len(cluster.out) == 3 and state.counters["events"] == 3 and tracker.commit_points() == {IN: 3}


def test_at_least_once_redis_away_holds_every_release_and_is_an_outage(loop: VirtualLoop) -> None:
    cluster, state = Cluster(IN[0], 1, 1_000_000, 300), SimState()
    state.up = False
    sink = SimSink(cluster)
    writer, refs, tracker = at_least_once([KafkaRecords(sink, SEALER), RedisOutcomes(state)])
    for ref in refs:
        writer.add(letter(ref))
    loop.create_task(writer.run())
    loop.settle()
    sink.deliver(3)
    loop.advance(1.0)
    assert len(cluster.out) == 3 and tracker.commit_points() == {IN: 0} and writer.outage
    state.up = True
    loop.advance(6.0)  # past the longest backoff
    assert tracker.commit_points() == {IN: 3} and not writer.outage and state.counters["events"] == 3


def exactly_once(fenced: list[FencedSink], producer: SimProducer, cluster: Cluster, *, budget_s: float = 30.0
                 ) -> tuple[TransactionalWriter, list[Ref]]:
    tracker = OffsetTracker()
    refs = [tracker.track(IN, offset) for offset in range(3)]
    writer = TransactionalWriter(fenced, KafkaTransaction(producer, SEALER), tracker, 0.1,
                                 lambda: Membership(cluster.generation), budget_s=budget_s)
    return writer, refs


def test_exactly_once_redis_applies_and_moves_its_fence_before_the_transaction_opens(loop: VirtualLoop) -> None:
    cluster, state = Cluster(IN[0], 1, 1_000_000, 300), SimState()
    producer = SimProducer(cluster)
    writer, refs = exactly_once([RedisOutcomes(state)], producer, cluster)
    for ref in refs:
        writer.add(letter(ref))
    loop.create_task(writer.run())
    loop.advance(0.15)
    assert producer.open is not None, "the transaction is open"
    assert state.counters["events"] == 3 and state.fence == {"in:0": 3}, "Redis went first, fenced"
    assert cluster.out == [] and cluster.committed == {}, "nothing of Kafka is visible before the commit"
    producer.end()
    loop.settle()
    assert len(cluster.out) == 3 and cluster.committed == {IN: 3} and writer.written == 3


def test_exactly_once_redis_away_opens_no_transaction_and_keeps_the_batch(loop: VirtualLoop) -> None:
    cluster, state = Cluster(IN[0], 1, 1_000_000, 300), SimState()
    state.up = False
    producer = SimProducer(cluster)
    writer, refs = exactly_once([RedisOutcomes(state)], producer, cluster, budget_s=1.0)
    writer.add(letter(refs[0]))
    loop.create_task(writer.run())
    for _ in range(30):  # 3 s: cycles of at most 1 s, each giving up
        loop.advance(0.1)
        assert producer.open is None
    assert writer.outage and writer.backlog == 1 and cluster.committed == {}


class Slow:
    """A `FencedSink` that takes `takes_s` and notes the budget it was given."""

    def __init__(self, takes_s: float) -> None:
        self.takes_s = takes_s
        self.given: list[float] = []

    async def apply(self, batch: list[Outcome], fence: dict[TP, int], give_up_s: float) -> bool:
        self.given.append(give_up_s)
        await asyncio.sleep(self.takes_s)
        return True


def test_exactly_once_the_fenced_sinks_share_the_cycle_budget(loop: VirtualLoop) -> None:
    """The consumer is not polled during a cycle: however many fenced sinks, together they get the budget."""
    cluster = Cluster(IN[0], 1, 1_000_000, 300)
    first, second = Slow(3.0), Slow(0.0)
    writer, refs = exactly_once([first, second], SimProducer(cluster), cluster, budget_s=10.0)
    writer.add(letter(refs[0]))
    loop.create_task(writer.run())
    loop.advance(3.5)
    assert first.given == [10.0] and second.given == [pytest.approx(7.0)]
