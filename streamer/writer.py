"""The output stage: writes answers, dead letters and window results to Kafka and Redis.

`Writer` (at least once): outcomes accumulate while a write is under way and go out together in the
next one, so Redis gets one pipeline per batch. An event counts as fully written only when Kafka
acknowledged its record and then its state is in Redis; only then may its offset be committed.

`TransactionalWriter` (exactly once): an outcome finishes its events at once; every commit interval
the outcomes whose events all lie below the commit points go out, Redis first (fenced by input
offset), then their records and those commit points in one Kafka transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import TypeVar

import orjson

from streamer.contracts import Answer, DeadLetter, WindowResult
from streamer.kafka.offsets import TP, OffsetTracker
from streamer.kafka.sink import DeliveryError, KafkaSink
from streamer.kafka.transactions import Ending, TransactionalProducer
from streamer.state.redis import RedisState, StateUnavailable, Written

log = logging.getLogger(__name__)

T = TypeVar("T")

_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


Ref = tuple[TP, int]
"""An event: its topic partition and offset."""


@dataclass(frozen=True)
class Outcome:
    """A result, addressed: where it goes and which events' parts it finishes once written."""

    topic: str
    kafka_key: bytes | None
    record: Answer | DeadLetter | WindowResult
    releases: tuple[Ref, ...]
    route: str


class Writer:
    def __init__(self, sink: KafkaSink, state: RedisState, tracker: OffsetTracker,
                 on_window: Callable[[str], None] | None = None) -> None:
        """`on_window(route)` hears of every final window result fully written (metrics)."""
        self._on_window = on_window
        self._sink = sink
        self._state = state
        self._tracker = tracker
        self._buffer: list[Outcome] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.written = 0  # events (answers and dead letters) fully written
        self.windows_written = 0  # final window results fully written

    @property
    def backlog(self) -> int:
        return len(self._buffer)

    @property
    def busy(self) -> bool:
        """Whether the consumer must not be polled now (see TransactionalWriter)."""
        return False

    def add(self, outcome: Outcome) -> None:
        self._buffer.append(outcome)
        self._idle.clear()
        self._wake.set()

    def forget(self, tps: Iterable[TP]) -> None:
        """Partitions went away: what is buffered of them is still written (a duplicate at worst), and
        its release of their offsets is ignored by the tracker."""

    async def run(self) -> None:
        """Write until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._buffer = self._buffer, []
            await self._write(batch)
            if not self._buffer:
                self._idle.set()

    async def drain(self) -> None:
        """Wait until everything added so far is fully written."""
        await self._idle.wait()

    async def _write(self, batch: list[Outcome]) -> None:
        payloads = [orjson.dumps(o.record.model_dump(mode="json")) for o in batch]
        deliveries = [self._sink.send(o.topic, o.kafka_key, p) for o, p in zip(batch, payloads, strict=True)]
        for outcome, payload, delivery in zip(batch, payloads, deliveries, strict=True):
            await self._delivered(outcome, payload, delivery)
        # Redis only after Kafka acknowledged: state that says "written" (a final window, say) then
        # always has its record on the topic, and a crash in between only repeats the record.
        written = _written(batch, payloads)
        await retrying("redis write", lambda: self._state.write(written))
        for outcome in batch:
            for tp, offset in outcome.releases:
                self._tracker.done(tp, offset)
        self._count(batch)

    def _count(self, batch: Iterable[Outcome]) -> None:
        for outcome in batch:
            if not isinstance(outcome.record, WindowResult):
                self.written += 1
            elif outcome.record.final:
                self.windows_written += 1
                if self._on_window is not None:
                    self._on_window(outcome.route)

    async def _delivered(self, outcome: Outcome, payload: bytes, delivery: asyncio.Future[None]) -> None:
        attempt = 0
        while True:
            try:
                await delivery
                return
            except DeliveryError as exc:
                pause = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
                log.warning("%s; producing again in %.1f s", exc, pause)
                await asyncio.sleep(pause)
                attempt += 1
                delivery = self._sink.send(outcome.topic, outcome.kafka_key, payload)


class TransactionalWriter(Writer):
    """Exactly once: Redis state fenced by input offset, then records and offsets in one Kafka transaction.

    Redis goes first: a crash (or an aborted transaction) after it leaves the offsets uncommitted, the
    events are replayed, and the fence (`streamer:fence`, the commit point per partition, stored in the
    same MULTI as the state) makes Redis skip them while Kafka gets their records again. An outcome
    waits until the commit points pass all its events, so a committed record always has its offsets
    committed with it, and replay never repeats it. An aborted transaction is produced again from
    memory (minus partitions revoked meanwhile, which their new owner replays).
    """

    def __init__(self, producer: TransactionalProducer, state: RedisState, tracker: OffsetTracker,
                 interval_s: float, group_metadata: Callable[[], object],
                 on_window: Callable[[str], None] | None = None) -> None:
        super().__init__(None, state, tracker, on_window)  # type: ignore[arg-type]  # no plain sink
        self._producer = producer
        self._interval_s = interval_s
        self._group_metadata = group_metadata
        self._held: list[Outcome] = []  # finished, but some of their events are not below the commit point
        self._writing = 0
        self._lock = asyncio.Lock()

    @property
    def backlog(self) -> int:
        """Outcomes waiting for Redis or Kafka; held ones wait for other events, not for the outputs."""
        return len(self._buffer) + self._writing

    @property
    def busy(self) -> bool:
        """A write cycle is under way. The consumer is not polled meanwhile, so no revoke can land
        between its Redis write and its Kafka commit (the new owner would replay what it commits)."""
        return self._lock.locked()

    def add(self, outcome: Outcome) -> None:
        for tp, offset in outcome.releases:
            self._tracker.done(tp, offset)
        self._buffer.append(outcome)
        self._idle.clear()

    def forget(self, tps: Iterable[TP]) -> None:
        """Drop the outcomes of revoked partitions: nothing of them was committed, their new owner
        replays them. One that also finishes owned events (a window holding several partitions'
        events) is kept for those: dropping it would let their offsets commit without a result."""
        gone = set(tps)
        self._buffer, self._held = _without(self._buffer, gone), _without(self._held, gone)

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
            self._held += self._buffer
            self._buffer = []
            ready, self._held = covered(self._held, self._tracker.commit_points())
            offsets = below(self._tracker.committable(), self._held)
            if ready or offsets:
                self._writing = len(ready)
                try:
                    await self._commit(ready, offsets)
                finally:
                    self._writing = 0
            if not self._buffer:
                self._idle.set()

    async def _commit(self, ready: list[Outcome], offsets: dict[TP, int]) -> None:
        payloads = [orjson.dumps(o.record.model_dump(mode="json")) for o in ready]
        await retrying("redis write", lambda: self._state.write(_written(ready, payloads), fence=offsets))
        while True:
            # Partitions lost while a try aborted (the session expired) belong to another member now:
            # commit nothing of theirs, or that member could replay what this one commits (as in
            # `forget`, an outcome that also finishes owned events stays, for those).
            owned = self._tracker.commit_points()
            kept = [i for i, o in enumerate(ready) if not o.releases or any(tp in owned for tp, _ in o.releases)]
            ready, payloads = [ready[i] for i in kept], [payloads[i] for i in kept]
            offsets = {tp: offset for tp, offset in offsets.items() if tp in owned}
            records = [(o.topic, o.kafka_key, p) for o, p in zip(ready, payloads, strict=True)]
            if await self._producer.transact(records, offsets, self._group_metadata()) is Ending.COMMITTED:
                break
        self._tracker.mark_committed(offsets)
        self._count(ready)


def covered(outcomes: list[Outcome], points: dict[TP, int]) -> tuple[list[Outcome], list[Outcome]]:
    """Split outcomes into those whose events all lie below their partition's commit point, and the rest."""
    ready: list[Outcome] = []
    held: list[Outcome] = []
    for outcome in outcomes:
        below = all(tp in points and offset < points[tp] for tp, offset in outcome.releases)
        (ready if below else held).append(outcome)
    return ready, held


def below(offsets: dict[TP, int], held: list[Outcome]) -> dict[TP, int]:
    """`offsets` lowered to the first event of any outcome still held: an outcome finishing events of
    several partitions can wait for one while another's commit point has passed its events already,
    and committing those without the outcome would lose it on a crash."""
    capped = dict(offsets)
    for outcome in held:
        for tp, offset in outcome.releases:
            if tp in capped and offset < capped[tp]:
                capped[tp] = offset
    return capped


def _without(outcomes: list[Outcome], gone: set[TP]) -> list[Outcome]:
    """Outcomes with the events of `gone` partitions taken out; ones left with none are dropped."""
    kept = []
    for outcome in outcomes:
        owned = tuple(ref for ref in outcome.releases if ref[0] not in gone)
        if len(owned) == len(outcome.releases):
            kept.append(outcome)
        elif owned:
            kept.append(replace(outcome, releases=owned))
    return kept


def _written(batch: list[Outcome], payloads: list[bytes]) -> list[Written]:
    return [Written(o.record, p, _key_text(o), o.route) for o, p in zip(batch, payloads, strict=True)]


async def retrying(what: str, action: Callable[[], Awaitable[T]]) -> T:
    """Run a Redis action until it succeeds, backing off while Redis is unavailable."""
    attempt = 0
    while True:
        try:
            return await action()
        except StateUnavailable as exc:
            pause = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, pause)
            await asyncio.sleep(pause)
            attempt += 1


def _key_text(outcome: Outcome) -> str | None:
    record = outcome.record
    if isinstance(record, Answer | WindowResult):
        return record.key
    return outcome.kafka_key.decode("utf-8", "replace") if outcome.kafka_key else None
