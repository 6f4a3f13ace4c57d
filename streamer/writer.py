"""The output stage: writes answers and dead letters to Kafka and Redis, then marks them fully written.

Outcomes accumulate while a write is under way and go out together in the next one, so Redis gets
one pipeline per batch. An event counts as fully written only when Kafka acknowledged its record and
then its state is in Redis; only then may the OffsetTracker let its offset be committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import orjson

from streamer.contracts import Answer, DeadLetter, WindowResult
from streamer.kafka.offsets import TP, OffsetTracker
from streamer.kafka.sink import DeliveryError, KafkaSink
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

    def add(self, outcome: Outcome) -> None:
        self._buffer.append(outcome)
        self._idle.clear()
        self._wake.set()

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
        written = [Written(o.record, p, _key_text(o), o.route) for o, p in zip(batch, payloads, strict=True)]
        await retrying("redis write", lambda: self._state.write(written))
        for outcome in batch:
            for tp, offset in outcome.releases:
                self._tracker.done(tp, offset)
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
