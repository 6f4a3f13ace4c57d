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
from streamer.kafka.offsets import OffsetTracker
from streamer.kafka.transactions import Ending, TransactionalProducer
from streamer.writer import Outcome, TransactionalWriter, below, covered

TP_A = ("in", 0)
TP_B = ("in", 1)


def outcome(*refs: tuple[tuple[str, int], int]) -> Outcome:
    letter = DeadLetter(error=ErrorCode.INVALID_JSON, detail="x", payload="x", payload_encoding="utf-8",
                        source=Source(topic="in", partition=0, offset=0), ts=0)
    return Outcome("dlq", None, letter, tuple(refs), "r")


def test_an_outcome_waits_until_every_event_it_finishes_is_below_the_commit_point():
    first, spanning, later = outcome((TP_A, 3)), outcome((TP_A, 4), (TP_B, 9)), outcome((TP_A, 7))
    ready, held = covered([first, spanning, later], {TP_A: 5, TP_B: 9})
    assert ready == [first]
    assert held == [spanning, later]


def test_outcomes_of_untracked_partitions_are_held_and_ones_without_events_go_at_once():
    provisional, revoked = outcome(), outcome((TP_B, 0))
    assert covered([provisional, revoked], {TP_A: 10}) == ([provisional], [revoked])


@given(st.lists(st.booleans(), min_size=1, max_size=60), st.randoms(use_true_random=False))
def test_committed_offsets_cover_exactly_the_released_outcomes(finished_flags, rng):
    """Events finish in any order; after each step, released outcomes are exactly the finished events
    below the partition's commit point, and the commit point never passes an unreleased one."""
    tracker = OffsetTracker()
    for offset in range(len(finished_flags)):
        tracker.track(TP_A, offset)
    order = [o for o, finished in enumerate(finished_flags) if finished]
    rng.shuffle(order)
    pending: list[Outcome] = []
    released: list[int] = []
    for offset in order:
        tracker.done(TP_A, offset)
        pending.append(outcome((TP_A, offset)))
        ready, pending = covered(pending, tracker.commit_points())
        released += [o.releases[0][1] for o in ready]
        point = tracker.commit_points()[TP_A]
        assert sorted(released) == [o for o in sorted(order) if o < point]
        assert all(o.releases[0][1] >= point for o in pending)


def test_offsets_never_pass_an_event_of_an_outcome_still_held():
    """A window holding events of two partitions waits for one of them; the other's commit point has
    passed its events already, but committing there would lose the window on a crash."""
    spanning = outcome((TP_A, 4), (TP_B, 9))
    assert below({TP_A: 8, TP_B: 9}, [spanning]) == {TP_A: 4, TP_B: 9}
    assert below({TP_A: 3}, [spanning]) == {TP_A: 3}, "never raised, and no partition added"


def test_a_revoke_drops_outcomes_of_revoked_partitions_but_keeps_one_spanning_an_owned_partition():
    """Its owned events were finished when it was added: dropped, they would commit without a result."""
    writer = TransactionalWriter(None, None, OffsetTracker(), 1.0, object)  # type: ignore[arg-type]
    revoked, spanning = outcome((TP_B, 1)), outcome((TP_A, 4), (TP_B, 9))
    owned, provisional = outcome((TP_A, 5)), outcome()
    for added in (revoked, spanning, owned, provisional):
        writer.add(added)
    writer.forget([TP_B])
    assert [o.releases for o in writer._buffer] == [((TP_A, 4),), ((TP_A, 5),), ()]
    assert writer._buffer[0].record is spanning.record


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

    def produce(self, topic: str, value: bytes, key: bytes | None) -> None:
        self.calls.append("produce")

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
        return await producer.transact([("out", None, b"x")], {("in", 0): 5}, object())

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
