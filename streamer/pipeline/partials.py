"""Answers that stream out: the pieces of `stream: true` routes' answers, written as progress while the model
generates them, every `partials.flush_ms`, to Redis (`partial:{route}:{id}` per event, `partials` for all) and, where
the route names a `partial_output` topic, as delta records to Kafka.

Progress is a side channel, best effort and at least once: the model hands pieces to a `PieceBuffer` and never
waits; one flush at a time takes every event's pending text (one delta per event) and writes it, Kafka records
queued first (they never wait), then one Redis pipeline bounded by `write_timeout_s`. While a write is slow the
pieces coalesce; a failed or timed-out write, or a full buffer, drops its deltas and counts them
(`streamer_partials_dropped_total`), and so are delta records past `MAX_UNACKED` waiting for the broker.
Nothing here touches the answer, its Redis state or the offset ledger, and nothing here can stop the pipeline:
a delta that cannot be written for any other reason (text Redis or JSON cannot encode, a bug) is dropped and
counted too (`unwritable`), and a piece holding a lone surrogate is written with U+FFFD in its place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import RedisError

from streamer.config import PartialSettings
from streamer.contracts import PartialDelta
from streamer.engine.backend import Broken
from streamer.observe.metrics import Metrics
from streamer.pipeline.pieces import ENDED, Delta, PieceBuffer
from streamer.state.redis import StateUnavailable

log = logging.getLogger(__name__)

MAX_UNACKED = 10_000
"""Delta records produced and not yet acknowledged, at most: with the broker away, more would fill the
producer's queue that the answers share, and its producer would then make the answers wait."""

_SURROGATE = re.compile("[\ud800-\udfff]")

Send = Callable[[str, bytes | None, bytes], asyncio.Future[None]]
"""Produce one record, acknowledged through the future (`KafkaSink.send`)."""


class PartialStore(Protocol):
    """Where deltas go in Redis (`RedisState.append_partials`)."""

    async def append_partials(self, deltas: Sequence[Delta], ttl_s: int, maxlen: int) -> None: ...


@dataclass(frozen=True)
class Progress:
    """One event's side channel: hand it pieces, then tell it the event ended."""

    writer: PartialWriter
    handle: int
    route: str

    def piece(self, text: str) -> None:
        self.writer.piece(self, text)

    def broken(self) -> None:
        """Text is missing from the pieces (their source's stream broke): the final marker shows a gap."""
        self.writer.buffer.broken(self.handle)

    def finish(self, error: str | None = None) -> None:
        self.writer.buffer.finish(self.handle, error)


class PartialWriter:
    def __init__(self, settings: PartialSettings, store: PartialStore, send: Send | None,
                 topics: Mapping[str, str], metrics: Metrics, max_pieces: int) -> None:
        """`topics`: route name -> its partial_output topic; `max_pieces` bounds an event's Redis stream (one
        entry per delta, a delta holding at least one token: the token cap and the final marker)."""
        self._settings, self._store, self._send, self._topics = settings, store, send, topics
        self._metrics = metrics
        self._maxlen = max_pieces + 1
        self.buffer = PieceBuffer(settings.max_buffered_chars, run_prefix=f"{os.urandom(6).hex()}-")
        self._flushing = asyncio.Lock()  # one flush at a time: an event's deltas reach Redis in order
        self._unacked = 0

    def open(self, event_id: str, route: str, key: str | None, record_key: bytes | None) -> Progress:
        """A run of the event's progress; an older run of the id still open is retired (`superseded`)."""
        handle, retired = self.buffer.open(event_id, route, key, record_key)
        if retired:
            self._metrics.partials_dropped(route, "superseded", retired)
        return Progress(self, handle, route)

    def piece(self, progress: Progress, text: str) -> None:
        if isinstance(text, Broken):
            progress.broken()
            return
        try:
            text.encode()
        except UnicodeEncodeError:  # a lone surrogate (json.loads accepts "\ud83d"): neither Redis nor JSON take it
            text = _SURROGATE.sub("\ufffd", text)
        if (dropped := self.buffer.add(progress.handle, text)) is not None and dropped != ENDED:
            self._metrics.partials_dropped(progress.route, dropped)

    async def run(self) -> None:
        """Flush every flush_ms, for as long as the pipeline runs."""
        while True:
            await asyncio.sleep(self._settings.flush_ms / 1000)
            await self.flush()

    async def flush(self) -> None:
        """Write what the buffer holds now; whatever fails is dropped and counted, never retried (the next
        flush has newer text, and the answer has all of it)."""
        async with self._flushing:
            try:
                deltas = self.buffer.take()
            except Exception:  # a bug: progress is lost, never the pipeline
                log.exception("could not take the pieces of streaming answers")
                return
            if deltas:
                self._produce(deltas)
                await self._append(deltas)

    async def _append(self, deltas: Sequence[Delta]) -> None:
        try:
            async with asyncio.timeout(self._settings.write_timeout_s):
                await self._store.append_partials(deltas, self._settings.ttl_s, self._maxlen)
        except (StateUnavailable, RedisError, TimeoutError) as exc:  # away, slow, refusing: progress waits for none
            log.debug("dropped %d deltas of streaming answers: %r", len(deltas), exc)
            for route, n in _per_route(deltas).items():
                self._metrics.partials_dropped(route, "redis", n)
            return
        except Exception as exc:  # what Redis cannot take, or a bug: dropped and counted, never fatal
            log.warning("dropped %d deltas of streaming answers that could not be written: %r", len(deltas), exc)
            for route, n in _per_route(deltas).items():
                self._metrics.partials_dropped(route, "unwritable", n)
            return
        for route, n in _per_route(deltas).items():
            self._metrics.partials_written(route, n)

    def _produce(self, deltas: Sequence[Delta]) -> None:
        if self._send is None:
            return
        for d in deltas:
            if (topic := self._topics.get(d.route)) is None:
                continue
            if self._unacked >= MAX_UNACKED:
                self._metrics.partials_dropped(d.route, "kafka")
                continue
            try:
                value = PartialDelta(id=d.id, route=d.route, key=d.key, seq=d.seq, delta=d.delta, final=d.final,
                                     error=d.error).model_dump_json().encode()
                future = self._send(topic, d.record_key, value)
            except Exception as exc:  # what JSON cannot encode, a producer refusing: dropped, never fatal
                log.warning("dropped a delta record of %s that could not be produced: %r", d.id, exc)
                self._metrics.partials_dropped(d.route, "unwritable")
                continue
            self._unacked += 1
            future.add_done_callback(self._delivered(d.route))

    def _delivered(self, route: str) -> Callable[[asyncio.Future[None]], None]:
        def count(future: asyncio.Future[None]) -> None:
            self._unacked -= 1
            if future.cancelled() or future.exception() is not None:
                self._metrics.partials_dropped(route, "kafka")
        return count


def _per_route(deltas: Sequence[Delta]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in deltas:
        counts[d.route] = counts.get(d.route, 0) + 1
    return counts
