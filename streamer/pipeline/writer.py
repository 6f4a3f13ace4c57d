"""The output stage: writes outcomes to Kafka and Redis, and tells the ledger what is fully written.

`Writer` (at least once): outcomes accumulate while a write is under way and go out together in the
next one, so Redis gets one pipeline per batch. An event counts as fully written only when Kafka
acknowledged its record and then its state is in Redis; only then is its part released.

`TransactionalWriter` (exactly once): an outcome finishes its events at once; every commit interval
the outcomes whose events all lie below the commit points go out, Redis first (fenced by input
offset), then their records and those commit positions in one Kafka transaction.

Both hold back an outcome that must not be partly replayed (`in_order`; every outcome, exactly
once) until every event it stands for is below its partition's commit point, and keep commits below
the first event of any outcome held (`release_plan`). A record Kafka refuses for what it is (too
large, invalid) is replaced by its dead letter, never produced for ever; a broker away is waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from streamer.contracts import Answer, WindowResult
from streamer.kafka.offsets import TP, OffsetTracker, Position
from streamer.kafka.sink import DeliveryError
from streamer.kafka.transactions import Ending, Record, Transacted
from streamer.outcomes import Outcome, Sealer
from streamer.state.redis import StateUnavailable, Written
from streamer.state.retry import backoff_s, retrying

log = logging.getLogger(__name__)

CYCLE_BUDGET_S = 30.0
"""Longest a transactional write cycle waits for Redis before it gives up until the next one: the
consumer is not polled during a cycle, and must be well within max.poll.interval.ms (300 s by
default; the pipeline lowers the budget to a third of a lower one)."""


class Outputs(Protocol):
    """Where the stages hand their outcomes (a writer)."""

    def add(self, outcome: Outcome) -> None: ...


class State(Protocol):
    """Where outcomes' incremental state goes (Redis)."""

    async def write(self, outcomes: list[Written], fence: dict[TP, int] | None = None) -> int: ...


class RecordSink(Protocol):
    """At least once: one record at a time, acknowledged through a future."""

    def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[None]: ...


class TransactionSink(Protocol):
    """Exactly once: records and commit positions in one transaction."""

    async def start(self) -> None: ...

    async def transact(self, records: list[Record], positions: dict[TP, Position], group_metadata: object
                       ) -> Transacted: ...


@dataclass(frozen=True)
class Plan:
    """What a write cycle may do: the outcomes to write now, those still held, and per partition the
    offset commits must stay below (the first event of a held outcome)."""

    ready: list[Outcome]
    held: list[Outcome]
    limits: dict[TP, int]


def release_plan(outcomes: list[Outcome], points: dict[TP, int]) -> Plan:
    """Split outcomes into those whose events all lie below what may be committed, and the rest.

    What may be committed is the commit point, lowered to the first event of every outcome held: an
    outcome finishing events of several partitions can wait for one while another's commit point has
    passed its events, and committing those without it would lose it on a crash. Holding one back can
    lower a limit below another outcome's events, so this repeats until nothing moves (each round only
    lowers limits and moves outcomes to held, so it ends)."""
    limits = dict(points)
    ready, held = list(outcomes), []
    while True:
        covered = [all(ref.tp in limits and ref.offset < limits[ref.tp] for ref in o.releases) for o in ready]
        if all(covered):
            firsts = _firsts(held)
            return Plan(ready, held, {tp: limits[tp] for tp in firsts if tp in limits})
        moved = [o for o, ok in zip(ready, covered, strict=True) if not ok]
        ready = [o for o, ok in zip(ready, covered, strict=True) if ok]
        held += moved
        for outcome in moved:
            for ref in outcome.releases:
                if ref.tp in limits and ref.offset < limits[ref.tp]:
                    limits[ref.tp] = ref.offset


class Writer:
    """At least once."""

    def __init__(self, sink: RecordSink, state: State, tracker: OffsetTracker, sealer: Sealer,
                 on_window: Callable[[str], None] | None = None) -> None:
        """`on_window(route)` hears of every final window result fully written (metrics)."""
        self._on_window = on_window
        self._sink = sink
        self._state = state
        self._tracker = tracker
        self._sealer = sealer
        self._buffer: list[Outcome] = []
        self._held: list[Outcome] = []  # in-order outcomes waiting for the commit points to pass them
        self._writing: list[Outcome] = []  # the batch being written now
        self._wake = asyncio.Event()
        self.written = 0  # events (answers and dead letters) fully written
        self.windows_written = 0  # final window results fully written
        self.outage = False  # waiting for Kafka or Redis to come back

    @property
    def backlog(self) -> int:
        """Outcomes waiting for Kafka and Redis (held ones wait for other events, not for the outputs:
        counting them would pause the input they wait for)."""
        return len(self._buffer)

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def busy(self) -> bool:
        """Whether the consumer must not be polled now (see TransactionalWriter)."""
        return False

    def add(self, outcome: Outcome) -> None:
        if outcome.in_order:  # its events count as finished now; commits stay below it until it is written
            for ref in outcome.releases:
                self._tracker.done(ref)
            self._held.append(outcome)
        else:
            self._buffer.append(outcome)
        self._wake.set()

    def forget(self, tps: Iterable[TP]) -> None:
        """Partitions went away: in-order outcomes of theirs are dropped (their next owner rebuilds them
        whole); what is buffered is still written (a duplicate at worst, its releases ignored)."""
        self._held = _without(self._held, set(tps))

    def limits(self) -> dict[TP, int]:
        """Per partition, the offset commits must stay below: the first event of an in-order outcome
        not written yet."""
        return _firsts(self._held + [o for o in self._writing if o.in_order])

    async def run(self) -> None:
        """Write until cancelled; held outcomes are looked at again every `_RECHECK_S`."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RECHECK_S if self._held else None):
                    await self._wake.wait()
            self._wake.clear()
            plan = release_plan(self._held, self._tracker.commit_points())
            self._held = plan.held
            self._writing, self._buffer = self._buffer + plan.ready, []
            if self._writing:
                try:
                    await self._write(self._writing)
                finally:
                    self._writing = []

    async def drain(self) -> None:
        """Wait until everything added so far is written (held outcomes whose events are not all below
        the commit points stay: their offsets are not committed, so they are replayed)."""
        while self._buffer or self._writing or release_plan(self._held, self._tracker.commit_points()).ready:
            self._wake.set()
            await asyncio.sleep(0.01)

    async def _write(self, batch: list[Outcome]) -> None:
        deliveries = [self._sink.send(o.topic, o.kafka_key, o.payload) for o in batch]
        batch = [await self._delivered(o, delivery) for o, delivery in zip(batch, deliveries, strict=True)]
        # Redis only after Kafka acknowledged: state that says "written" (a final window, say) then
        # always has its record on the topic, and a crash in between only repeats the record.
        await retrying("redis write", lambda: self._state.write(_written(batch)), waiting=self._waiting)
        for outcome in batch:
            if not outcome.in_order:
                for ref in outcome.releases:
                    self._tracker.done(ref)
        _count(self, batch)

    async def _delivered(self, outcome: Outcome, delivery: asyncio.Future[None]) -> Outcome:
        """The outcome once acknowledged: a broker away is waited for; a record refused for what it is is
        replaced by its dead letter (twice at most: a refused dead letter by a bare one)."""
        attempt, replaced = 0, 0
        while True:
            try:
                await delivery
                self.outage = False
                return outcome
            except DeliveryError as exc:
                if exc.refused is not None and replaced < 2:
                    log.warning("%s; writing a %s dead letter in its place", exc, exc.refused.value)
                    outcome = self._sealer.replacement(outcome.record, exc.refused, str(exc), outcome.releases,
                                                       outcome.route, in_order=outcome.in_order)
                    replaced += 1
                else:
                    pause = backoff_s(attempt)
                    log.warning("%s; producing again in %.1f s", exc, pause)
                    self.outage = True
                    await asyncio.sleep(pause)
                    attempt += 1
                delivery = self._sink.send(outcome.topic, outcome.kafka_key, outcome.payload)


    def _waiting(self, waiting: bool) -> None:
        self.outage = waiting


_RECHECK_S = 0.05


class TransactionalWriter:
    """Exactly once: Redis state fenced by input offset, then records and offsets in one Kafka transaction.

    Redis goes first: a crash (or an aborted transaction) after it leaves the offsets uncommitted, the
    events are replayed, and the fence (`{prefix}:fence`, the commit point per partition, stored in the
    same MULTI as the state) makes Redis skip them while Kafka gets their records again. An outcome
    waits until the commit points pass all its events, so a committed record always has its offsets
    committed with it, and a replay never repeats it.

    A cycle is bounded: Redis is waited for at most `budget_s`, and a transaction is tried once;
    then the cycle ends with its outcomes kept, so the consumer is polled (membership, rebalances) and
    the next cycle tries again. An outcome of a partition revoked meanwhile is dropped: its next owner
    replays it (Redis, fenced, skips what this one applied)."""

    def __init__(self, producer: TransactionSink, state: State, tracker: OffsetTracker, sealer: Sealer,
                 interval_s: float, group_metadata: Callable[[], object],
                 on_window: Callable[[str], None] | None = None, budget_s: float = CYCLE_BUDGET_S) -> None:
        self._producer = producer
        self._budget_s = budget_s
        self._state = state
        self._tracker = tracker
        self._sealer = sealer
        self._interval_s = interval_s
        self._group_metadata = group_metadata
        self._on_window = on_window
        self._buffer: list[Outcome] = []
        self._held: list[Outcome] = []  # finished, but some of their events are not below the commit point
        self._unwritten: list[Outcome] = []  # ready, but the last cycle could not write them
        self._writing = 0
        self._lock = asyncio.Lock()
        self.written = 0
        self.windows_written = 0
        self.outage = False  # the last cycle could not reach Redis, or its transaction did not commit

    @property
    def backlog(self) -> int:
        """Outcomes waiting for Redis or Kafka (held ones wait for other events, not for the outputs): what
        pauses the input while Redis or Kafka is away."""
        return len(self._buffer) + self._writing + len(self._unwritten)

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def busy(self) -> bool:
        """A write cycle is under way. The consumer is not polled meanwhile, so no revoke can land
        between its Redis write and its Kafka commit (the new owner would replay what it commits)."""
        return self._lock.locked()

    def add(self, outcome: Outcome) -> None:
        """Its events count as finished now; an outcome of an earlier assignment of its partition (an
        answer arriving after a loss and reassignment) is dropped: the replay makes it again."""
        current = tuple(ref for ref in outcome.releases if self._tracker.current(ref))
        for ref in current:
            self._tracker.done(ref)
        if outcome.releases and not current:
            return
        self._buffer.append(outcome if len(current) == len(outcome.releases) else replace(outcome, releases=current))

    def forget(self, tps: Iterable[TP]) -> None:
        """Drop the outcomes of revoked partitions: nothing of them was committed, their new owner
        replays them. One that also finishes owned events (a window holding several partitions'
        events) is kept for those: dropping it would let their offsets commit without a result."""
        gone = set(tps)
        self._buffer, self._held = _without(self._buffer, gone), _without(self._held, gone)
        self._unwritten = _without(self._unwritten, gone)

    def limits(self) -> dict[TP, int]:
        """Commits happen inside the transactions: nothing for the consumer to hold back."""
        return {}

    async def run(self) -> None:
        await self._producer.start()
        while True:
            await asyncio.sleep(self._interval_s)
            await self._cycle()

    async def drain(self) -> None:
        """Write everything whose events are all finished (outcomes waiting on open windows stay: replayed)."""
        await self._cycle()

    async def _cycle(self) -> None:
        async with self._lock:
            plan = release_plan(self._unwritten + self._held + self._buffer, self._tracker.commit_points())
            positions = self._tracker.positions(plan.limits)
            self._buffer, self._held, self._unwritten = [], plan.held, []
            if not plan.ready and not positions:
                return
            self._writing = len(plan.ready)
            try:
                self._unwritten = await self._commit(plan.ready, positions)  # not committed: tried again next
            finally:
                self._writing = 0

    async def _commit(self, ready: list[Outcome], positions: dict[TP, Position]) -> list[Outcome]:
        """One try: Redis (fenced), then one transaction. Returns what is left to commit."""
        fence = {tp: position.offset for tp, position in positions.items()}
        try:
            await retrying("redis write", lambda: self._state.write(_written(ready), fence=fence),
                           give_up_s=self._budget_s)
        except StateUnavailable:
            self.outage = True
            return ready  # the consumer is polled before the next try; the write is idempotent
        records = [(o.topic, o.kafka_key, o.payload) for o in ready]
        transacted = await self._producer.transact(records, positions, self._group_metadata())
        self.outage = transacted.ending is not Ending.COMMITTED
        if transacted.ending is Ending.COMMITTED:
            self._tracker.mark_committed(positions)
            _count(self, ready)
            return []
        for index, code in transacted.refused.items():
            outcome = ready[index]
            log.warning("%s refused a record (%s); writing a dead letter in its place", outcome.topic, code.value)
            ready[index] = self._sealer.replacement(outcome.record, code, f"{outcome.topic}: refused ({code.value})",
                                                    outcome.releases, outcome.route, in_order=outcome.in_order)
        return ready


def _count(writer: Writer | TransactionalWriter, batch: Iterable[Outcome]) -> None:
    for outcome in batch:
        if not isinstance(outcome.record, WindowResult):
            writer.written += 1
        elif outcome.record.final:
            writer.windows_written += 1
            if writer._on_window is not None:
                writer._on_window(outcome.route)


def _firsts(outcomes: Iterable[Outcome]) -> dict[TP, int]:
    """Per partition, the first event of any of these outcomes."""
    firsts: dict[TP, int] = {}
    for outcome in outcomes:
        for ref in outcome.releases:
            firsts[ref.tp] = min(ref.offset, firsts.get(ref.tp, ref.offset))
    return firsts


def _without(outcomes: list[Outcome], gone: set[TP]) -> list[Outcome]:
    """Outcomes with the events of `gone` partitions taken out; ones left with none are dropped."""
    kept = []
    for outcome in outcomes:
        owned = tuple(ref for ref in outcome.releases if ref.tp not in gone)
        if len(owned) == len(outcome.releases):
            kept.append(outcome)
        elif owned:
            kept.append(replace(outcome, releases=owned))
    return kept


def _written(batch: list[Outcome]) -> list[Written]:
    return [Written(o.record, o.payload, _key_text(o), o.route) for o in batch]


def _key_text(outcome: Outcome) -> str | None:
    record = outcome.record
    if isinstance(record, Answer | WindowResult):
        return record.key
    return outcome.kafka_key.decode("utf-8", "replace") if outcome.kafka_key else None
