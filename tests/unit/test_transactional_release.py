"""Exactly once: an outcome goes into a transaction only once the commit points pass all its events,
so the offsets committed with a record always cover every event it stands for; and a transaction the
broker's absence leaves hanging ends in a clean redo, never a stall."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from hypothesis import given
from hypothesis import strategies as st

from streamer.contracts import DeadLetter, ErrorCode, Source
from streamer.kafka import transactions
from streamer.kafka.offsets import OffsetTracker, Position, Ref
from streamer.kafka.transactions import Ending, TransactionalProducer
from streamer.outcomes import Outcome, Sealer
from streamer.pipeline.sinks.kafka import KafkaTransaction
from streamer.pipeline.sinks.redis import RedisOutcomes
from streamer.pipeline.writer import TransactionalWriter, release_plan
from tests.sim.kafka import Cluster, SimProducer
from tests.sim.state import SimState

TP_A = ("in", 0)
TP_B = ("in", 1)
SEALER = Sealer(1_000_000, "dlq")


def ref(tp: tuple[str, int], offset: int) -> Ref:
    return Ref(tp, offset, 0)


def exactly_once(tracker: OffsetTracker) -> TransactionalWriter:
    """A writer that is only given outcomes and revokes here: its sinks are never called."""
    producer = SimProducer(Cluster(TP_A[0], 2, 1_000_000, 300))
    return TransactionalWriter([RedisOutcomes(SimState())], KafkaTransaction(producer, SEALER), tracker, 1.0, object)


def outcome(*refs: Ref) -> Outcome:
    letter = DeadLetter(error=ErrorCode.INVALID_JSON, detail="x", payload="x", payload_encoding="utf-8",
                        source=Source(topic="in", partition=0, offset=0), ts=0)
    return SEALER.seal("dlq", None, letter, tuple(refs), "r")


def test_an_outcome_waits_until_every_event_it_finishes_is_below_the_commit_point():
    first, spanning, later = outcome(ref(TP_A, 3)), outcome(ref(TP_A, 4), ref(TP_B, 9)), outcome(ref(TP_A, 7))
    plan = release_plan([first, spanning, later], {TP_A: 5, TP_B: 9})
    assert plan.ready == [first]
    assert plan.held == [spanning, later]


def test_outcomes_of_untracked_partitions_are_held_and_ones_without_events_go_at_once():
    provisional, revoked = outcome(), outcome(ref(TP_B, 0))
    plan = release_plan([provisional, revoked], {TP_A: 10})
    assert (plan.ready, plan.held) == ([provisional], [revoked])


@given(st.lists(st.booleans(), min_size=1, max_size=60), st.randoms(use_true_random=False))
def test_committed_offsets_cover_exactly_the_released_outcomes(finished_flags, rng):
    """Events finish in any order; after each step, released outcomes are exactly the finished events
    below the partition's commit point, and the commit point never passes an unreleased one."""
    tracker = OffsetTracker()
    refs = [tracker.track(TP_A, offset) for offset in range(len(finished_flags))]
    order = [r for r, finished in zip(refs, finished_flags, strict=True) if finished]
    rng.shuffle(order)
    pending: list[Outcome] = []
    released: list[int] = []
    for done in order:
        tracker.done(done)
        pending.append(outcome(done))
        plan = release_plan(pending, tracker.commit_points())
        pending = plan.held
        released += [o.releases[0].offset for o in plan.ready]
        point = tracker.commit_points()[TP_A]
        assert sorted(released) == [r.offset for r in sorted(order, key=lambda r: r.offset) if r.offset < point]
        assert all(o.releases[0].offset >= point for o in pending)


def test_offsets_never_pass_an_event_of_an_outcome_still_held():
    """A window holding events of two partitions waits for one of them; the other's commit point has
    passed its events already, but committing there would lose the window on a crash."""
    spanning = outcome(ref(TP_A, 4), ref(TP_B, 9))
    assert release_plan([spanning], {TP_A: 8, TP_B: 9}).limits == {TP_A: 4, TP_B: 9}
    assert release_plan([spanning], {TP_A: 3}).limits == {TP_A: 3}, "never raised, and no partition added"


def test_a_ready_outcome_is_never_committed_with_offsets_lowered_below_its_own_events():
    """Review finding 5: a window waits at 5 while answers 3 and 4 are ready; the limit it sets lowers A's
    offset to 3, below the answers' events, so they must wait too (before, they were committed with offset
    3, and a crash or revoke replayed and committed them again)."""
    window = outcome(ref(TP_A, 3), ref(TP_A, 5), ref(TP_B, 9))  # waits for B
    answer3, answer4 = outcome(ref(TP_A, 3)), outcome(ref(TP_A, 4))
    plan = release_plan([window, answer3, answer4], {TP_A: 6, TP_B: 9})
    assert plan.ready == [] and plan.limits[TP_A] == 3


@given(st.lists(st.lists(st.tuples(st.sampled_from([TP_A, TP_B]), st.integers(0, 12)), max_size=3), max_size=12),
       st.integers(0, 13), st.integers(0, 13))
def test_every_ready_outcome_lies_below_the_offsets_committed_with_it(events, point_a, point_b):
    """The combined invariant: whatever is released, every event it finishes is below the offset
    committed in the same transaction, and no held outcome has an event below it."""
    outcomes = [outcome(*(ref(tp, o) for tp, o in refs)) for refs in events]
    plan = release_plan(outcomes, {TP_A: point_a, TP_B: point_b})
    tracker = OffsetTracker()
    for tp, point in ((TP_A, point_a), (TP_B, point_b)):
        for offset in range(point + 1):
            r = tracker.track(tp, offset)
            if offset < point:
                tracker.done(r)
    positions = tracker.positions(plan.limits)
    committed = {tp: p.offset for tp, p in positions.items()}
    for ready in plan.ready:
        assert all(r.offset < committed.get(r.tp, 0) for r in ready.releases)
    for held in plan.held:
        assert all(r.offset >= committed.get(r.tp, 0) for r in held.releases if r.tp in committed)


def test_a_revoke_drops_outcomes_of_revoked_partitions_but_keeps_one_spanning_an_owned_partition():
    """Its owned events were finished when it was added: dropped, they would commit without a result."""
    tracker = OffsetTracker()
    for tp, offsets in ((TP_A, range(6)), (TP_B, range(10))):
        for offset in offsets:
            tracker.track(tp, offset)
    writer = exactly_once(tracker)
    revoked, spanning = outcome(ref(TP_B, 1)), outcome(ref(TP_A, 4), ref(TP_B, 9))
    owned, provisional = outcome(ref(TP_A, 5)), outcome()
    for added in (revoked, spanning, owned, provisional):
        writer.add(added)
    writer.forget([TP_B])
    assert [o.releases for o in writer._buffer] == [(ref(TP_A, 4),), (ref(TP_A, 5),), ()]
    assert writer._buffer[0].record is spanning.record


def test_an_outcome_of_an_earlier_assignment_is_dropped_and_finishes_nothing():
    """Review finding 7, exactly once: the partition was lost and assigned back; an answer of the old
    incarnation must not be committed (the replay makes it again) nor finish a part of the new one."""
    tracker = OffsetTracker()
    old = tracker.track(TP_A, 3)
    tracker.forget([TP_A])
    new = tracker.track(TP_A, 3)
    writer = exactly_once(tracker)
    writer.add(outcome(old))
    assert writer._buffer == [] and tracker.in_flight(TP_A) == 1 and tracker.live(new)


class FakeProducer:
    """Records the transactional calls; `send_offsets` and `commit` play a script of outcomes in turn:
    None succeeds, an exception is raised, "hang" blocks until the test ends."""

    released: threading.Event  # set when the test ends (see short_calls)

    def __init__(self, send_offsets: list[Any], commit: list[Any]) -> None:
        self.calls: list[str] = []
        self._scripts = {"send_offsets_to_transaction": send_offsets, "commit_transaction": commit}

    def _play(self, name: str) -> None:
        self.calls.append(name)
        step = self._scripts[name].pop(0) if self._scripts[name] else None
        if step == "hang":
            self.released.wait()
        elif step is not None:
            raise step

    def init_transactions(self, timeout: float) -> None:
        self.calls.append("init_transactions")

    def begin_transaction(self) -> None:
        self.calls.append("begin_transaction")

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Any = None) -> None:
        self.calls.append("produce")

    def poll(self, timeout: float) -> int:
        return 0

    def send_offsets_to_transaction(self, positions: Any, metadata: Any, timeout: float) -> None:
        self._play("send_offsets_to_transaction")

    def commit_transaction(self, timeout: float) -> None:
        self._play("commit_transaction")

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort_transaction")

    def purge(self) -> None:
        self.calls.append("purge")


def retriable(reason: str) -> KafkaException:
    return KafkaException(KafkaError(KafkaError._TRANSPORT, reason, retriable=True))


def producers(*scripts: tuple[list[Any], list[Any]]) -> tuple[TransactionalProducer, list[FakeProducer]]:
    made: list[FakeProducer] = []

    def make(_config: dict[str, Any]) -> FakeProducer:
        made.append(FakeProducer(*scripts[len(made)]))
        return made[-1]

    return TransactionalProducer({}, make), made


@pytest.fixture(autouse=True)
def short_calls(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(transactions, "_CALL_TIMEOUT_S", 0.05)
    monkeypatch.setattr(transactions, "_GRACE_S", 0.05)
    monkeypatch.setattr(FakeProducer, "released", threading.Event(), raising=False)
    yield
    FakeProducer.released.set()


def transact(producer: TransactionalProducer) -> Ending:
    async def run() -> Ending:
        await producer.start()
        return (await producer.transact([("out", None, b"x")], {("in", 0): Position(5)}, object())).ending

    return asyncio.run(run())


def test_offsets_that_never_answer_replace_the_producer_and_the_batch_is_redone():
    """librdkafka waits for send_offsets_to_transaction without a deadline while the broker is away;
    the stuck producer is never called again (an abort would conflict with the call in progress)."""
    producer, made = producers((["hang"], []), ([], []))
    assert transact(producer) is Ending.ABORTED
    stuck, fresh = made
    assert "abort_transaction" not in stuck.calls
    assert fresh.calls == ["init_transactions"]


def test_offsets_failing_abort_the_transaction_instead_of_retrying_the_call():
    """send_offsets_to_transaction is not resumable: a retriable failure still ends the transaction."""
    producer, made = producers(([retriable("broker down")], []))
    assert transact(producer) is Ending.ABORTED
    assert made[0].calls[-2:] == ["send_offsets_to_transaction", "abort_transaction"] and len(made) == 1


def test_a_commit_timing_out_is_resumed_in_place_never_abandoned():
    """Once EndTxn may have reached the coordinator only its answer says whether the batch committed."""
    producer, made = producers(([], [retriable("flush timed out"), retriable("flush timed out")]))
    assert transact(producer) is Ending.COMMITTED
    assert made[0].calls.count("commit_transaction") == 3 and "abort_transaction" not in made[0].calls
    assert len(made) == 1
