"""The output stage: hands outcomes to the sinks in the order a guarantee needs, and tells the ledger what
is fully written. Where the outcomes go is the sinks' business (`streamer.pipeline.sinks`); the order, the
batching and the holding back are this module's.

`Writer` (at least once), over an ordered list of `Sink`s (the pipeline's: Kafka, then Redis): outcomes
accumulate while a write is under way and go out together in the next one, so each sink gets one batch.
Every sink takes the whole batch before the next sees it, and an event counts as fully written only once
the last took it: Kafka acknowledged its record and then its state is in Redis; only then is its part
released.

`TransactionalWriter` (exactly once), over `FencedSink`s (Redis) and the one `TransactionalSink` (Kafka): an
outcome finishes its events at once; every commit interval the outcomes whose events all lie below the
commit points go out, to the fenced sinks first (skipping what a replay already applied), then their
records and those commit positions in one Kafka transaction.

Both hold back an outcome that must not be partly replayed (`in_order`; every outcome, exactly
once) until every event it stands for is below its partition's commit point, and keep commits below
the first event of any outcome held (`release_plan`). Retries, idempotency and records refused for what
they are (replaced by their dead letters, never produced for ever) are each sink's own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from streamer.contracts import WindowResult
from streamer.kafka.offsets import TP, OffsetTracker, Position
from streamer.outcomes import Outcome
from streamer.pipeline.sinks import FencedSink, Sink, TransactionalSink

CYCLE_BUDGET_S = 30.0
"""Longest a transactional write cycle waits for Redis before it gives up until the next one: the
consumer is not polled during a cycle, and must be well within max.poll.interval.ms (300 s by
default; the pipeline lowers the budget to a third of a lower one)."""


class Outputs(Protocol):
    """Where the stages hand their outcomes (a writer)."""

    def add(self, outcome: Outcome) -> None: ...


class WindowOutputs(Outputs, Protocol):
    """Where window stages hand their results (a writer), which also says what it has not written yet."""

    def unwritten_finals(self) -> set[str]:
        """Ids of the final window results added and not yet fully written: neither Kafka nor Redis may
        have them yet, but they will reach the topic ahead of anything added from now on."""
        ...


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
    ready: list[Outcome] = list(outcomes)
    held: list[Outcome] = []
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

    def __init__(self, sinks: Sequence[Sink], tracker: OffsetTracker,
                 on_window: Callable[[str], None] | None = None) -> None:
        """`sinks` in the order they are written; `on_window(route)` hears of every final window result
        fully written (metrics)."""
        self._sinks = tuple(sinks)
        self._tracker = tracker
        self._tally = _Tally(on_window)
        self._buffer: list[Outcome] = []
        self._held: list[Outcome] = []  # in-order outcomes waiting for the commit points to pass them
        self._writing: list[Outcome] = []  # the batch being written now
        self._wake = asyncio.Event()

    @property
    def written(self) -> int:
        """Events (answers and dead letters) fully written."""
        return self._tally.written

    @property
    def windows_written(self) -> int:
        """Final window results fully written."""
        return self._tally.windows

    @property
    def outage(self) -> bool:
        """Waiting for a sink to come back (Kafka or Redis)."""
        return any(sink.outage for sink in self._sinks)

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

    def unwritten_finals(self) -> set[str]:
        return _finals(self._buffer + self._writing + self._held)

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
        # Each sink only once the one before took the whole batch: state in Redis that says "written" (a
        # final window, say) then always has its record on the topic, and a crash in between only repeats
        # the record. A sink may replace a refused record by its dead letter: the next writes that.
        for sink in self._sinks:
            batch = await sink.write(batch)
        for outcome in batch:
            if not outcome.in_order:
                for ref in outcome.releases:
                    self._tracker.done(ref)
        self._tally.count(batch)


_RECHECK_S = 0.05


class TransactionalWriter:
    """Exactly once: the fenced sinks' state (Redis, fenced by input offset), then records and offsets in
    one transaction (Kafka).

    The fenced sinks go first: a crash (or an aborted transaction) after them leaves the offsets
    uncommitted, the events are replayed, and the fence (Redis: `{prefix}:fence`, the commit point per
    partition, stored in the same MULTI as the state) makes them skip what they applied while Kafka gets
    the records again. An outcome waits until the commit points pass all its events, so a committed
    record always has its offsets committed with it, and a replay never repeats it.

    A cycle is bounded: the fenced sinks are waited for at most `budget_s` together, and a transaction
    is tried once; then the cycle ends with its outcomes kept, so the consumer is polled (membership,
    rebalances) and the next cycle tries again. An outcome of a partition revoked meanwhile is dropped:
    its next owner replays it (Redis, fenced, skips what this one applied)."""

    def __init__(self, fenced: Sequence[FencedSink], transaction: TransactionalSink, tracker: OffsetTracker,
                 interval_s: float, group_metadata: Callable[[], object],
                 on_window: Callable[[str], None] | None = None, budget_s: float = CYCLE_BUDGET_S) -> None:
        """`fenced` in the order they are applied, before `transaction` commits; `group_metadata()` is the
        consumer's, for the transaction's offsets."""
        self._fenced = tuple(fenced)
        self._transaction = transaction
        self._budget_s = budget_s
        self._tracker = tracker
        self._interval_s = interval_s
        self._group_metadata = group_metadata
        self._tally = _Tally(on_window)
        self._buffer: list[Outcome] = []
        self._held: list[Outcome] = []  # finished, but some of their events are not below the commit point
        self._unwritten: list[Outcome] = []  # ready, but the last cycle could not write them
        self._committing: list[Outcome] = []  # what the cycle under way writes
        self._writing = 0
        self._lock = asyncio.Lock()
        self.outage = False  # the last cycle could not reach a fenced sink, or its transaction did not commit

    @property
    def written(self) -> int:
        """Events (answers and dead letters) committed."""
        return self._tally.written

    @property
    def windows_written(self) -> int:
        """Final window results committed."""
        return self._tally.windows

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

    def unwritten_finals(self) -> set[str]:
        return _finals(self._buffer + self._held + self._unwritten + self._committing)

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
        await self._transaction.start()
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
            self._writing, self._committing = len(plan.ready), plan.ready
            try:
                self._unwritten = await self._commit(plan.ready, positions)  # not committed: tried again next
            finally:
                self._writing, self._committing = 0, []

    async def _commit(self, ready: list[Outcome], positions: dict[TP, Position]) -> list[Outcome]:
        """One try: the fenced sinks, then one transaction. Returns what is left to commit."""
        fence = {tp: position.offset for tp, position in positions.items()}
        if not await self._apply(ready, fence):
            self.outage = True
            return ready  # the consumer is polled before the next try; the fenced writes are idempotent
        attempt = await self._transaction.commit(ready, positions, self._group_metadata())
        self.outage = not attempt.committed
        if attempt.committed:
            self._tracker.mark_committed(positions)
            self._tally.count(ready)
            return []
        return attempt.batch  # refused records replaced by their dead letters

    async def _apply(self, ready: list[Outcome], fence: dict[TP, int]) -> bool:
        """Every fenced sink in turn, all within the cycle's budget; False at the first that stays away."""
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + self._budget_s
        for sink in self._fenced:
            if not await sink.apply(ready, fence, give_up_s=deadline_s - loop.time()):
                return False
        return True


@dataclass
class _Tally:
    """What a writer wrote fully, for the pipeline's progress and its metrics."""

    on_window: Callable[[str], None] | None
    written: int = 0  # events: answers and dead letters
    windows: int = 0  # final window results

    def count(self, batch: Iterable[Outcome]) -> None:
        for outcome in batch:
            if not isinstance(outcome.record, WindowResult):
                self.written += 1
            elif outcome.record.final:
                self.windows += 1
                if self.on_window is not None:
                    self.on_window(outcome.route)


def _firsts(outcomes: Iterable[Outcome]) -> dict[TP, int]:
    """Per partition, the first event of any of these outcomes."""
    firsts: dict[TP, int] = {}
    for outcome in outcomes:
        for ref in outcome.releases:
            firsts[ref.tp] = min(ref.offset, firsts.get(ref.tp, ref.offset))
    return firsts


def _finals(outcomes: Iterable[Outcome]) -> set[str]:
    return {o.record.id for o in outcomes if isinstance(o.record, WindowResult) and o.record.final}


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
