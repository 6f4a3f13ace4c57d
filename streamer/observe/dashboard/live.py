"""The dashboard's live updates: one set of Redis readers per process, shared by every open event stream.

Readers of its own per stream (a blocking XREAD and a SUBSCRIBE connection each) would let browsers use
up Redis' clients, and the pipeline's writes would then fail. Here the readers start with the first
stream and stop with the last; each stream only has a bounded queue. A stream that falls that far
behind (its browser stopped reading) is ended; the browser reconnects and reloads the snapshot.

Each stream starts where the streams ended when it joined, so it gets everything written after its
browser saw it open (and so after its snapshot): the shared reader is never past that point, and
entries before it are skipped for that stream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streamer.observe.dashboard import entries
from streamer.state.keys import Keys

TICK_S = 1.0  # counters push period: the browser derives answers/s from successive ticks
_BLOCK_MS = 10_000  # one XREAD waits at most this long, so a dead stream is noticed on the next write
_RETRY_S = 1.0  # pause before reading Redis again after an error
_STREAM_BATCH = 200  # entries per XREAD reply
_QUEUE = 1000  # events buffered per stream
_RECANCEL_S = 0.1  # how long stopping readers get before they are cancelled again

EntryId = tuple[int, int]


@dataclass(eq=False)
class Listener:
    """One open event stream: what it still has to send, and the entries its snapshot already covers."""

    handler: asyncio.Task[object]
    after: dict[str, EntryId]
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(_QUEUE))

    def end(self) -> None:
        """Finish the response after what is queued; one whose queue is full is stuck writing to a browser
        that stopped reading, so its handler is cancelled instead."""
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:
            self.handler.cancel()


class LiveFeed:
    """The shared readers and the streams they feed; `join` and `leave` start and stop the readers."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._listeners: set[Listener] = set()
        self._readers: list[asyncio.Task[None]] = []
        self._pubsub: aioredis.client.PubSub | None = None
        self._lock = asyncio.Lock()  # joins and the readers' start and stop, one at a time

    async def join(self, handler: asyncio.Task[object]) -> Listener:
        """A new stream, starting now; raises RedisError when Redis cannot be read (before any response)."""
        async with self._lock:
            ends = {stream: await _stream_end(self._client, stream)
                    for stream in (self._keys.answers, self._keys.dead_letters, self._keys.partials)}
            if not self._readers:
                await self._start(ends)
            listener = Listener(handler, {stream: _entry_id(end) for stream, end in ends.items()})
            self._listeners.add(listener)
            return listener

    async def leave(self, listener: Listener) -> None:
        self._listeners.discard(listener)
        # Shielded: the handler leaving may be cancelled again (a shutdown) while the readers stop.
        await asyncio.shield(self._stop_when_unused())

    def end_all(self) -> None:
        for listener in list(self._listeners):
            listener.end()

    async def _start(self, after: dict[str, str]) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._keys.channel)
        except BaseException:
            await pubsub.aclose()
            raise
        self._pubsub = pubsub
        self._readers = [asyncio.create_task(reader) for reader in
                         (self._tail(dict(after)), self._window_results(pubsub), self._ticks())]

    async def _stop_when_unused(self) -> None:
        async with self._lock:
            if not self._listeners and self._readers:
                await self._stop()

    async def _stop(self) -> None:
        # redis-py (8.2) can swallow a cancellation inside a command, and a reader would then go on for
        # ever: cancel again until every reader is gone.
        pending = set(self._readers)
        while pending:
            for reader in pending:
                reader.cancel()
            _, pending = await asyncio.wait(pending, timeout=_RECANCEL_S)
        self._readers = []
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None

    def _send(self, chunk: bytes, entry: tuple[str, EntryId] | None = None) -> None:
        """To every stream; a stream `entry` (stream, id) only to those that joined before it was written."""
        for listener in list(self._listeners):
            if entry is not None and entry[1] <= listener.after[entry[0]]:
                continue
            try:
                listener.queue.put_nowait(chunk)
            except asyncio.QueueFull:
                self._listeners.discard(listener)
                listener.handler.cancel()

    async def _tail(self, after: dict[str, str]) -> None:
        """Answers, dead letters and the pieces of streaming answers as they are added, in one blocking XREAD
        over the three streams."""
        while True:
            try:
                reply = await self._client.xread(after, count=_STREAM_BATCH, block=_BLOCK_MS)
            except RedisError as exc:
                self._send(entries.problem(exc))
                await asyncio.sleep(_RETRY_S)
                continue
            for stream, items in reply.items() if isinstance(reply, dict) else reply or []:
                for entry_id, fields in items:
                    after[stream] = entry_id
                    if stream == self._keys.answers:
                        event, item = "answer", entries.answer(entry_id, fields)
                    elif stream == self._keys.partials:
                        event, item = "partial", entries.partial(entry_id, fields)
                    else:
                        event, item = "dead_letter", entries.dead_letter(entry_id, fields)
                    if item is not None:
                        self._send(entries.sse(event, item), (stream, _entry_id(entry_id)))

    async def _window_results(self, pubsub: aioredis.client.PubSub) -> None:
        """Window results as they are published; redis-py resubscribes by itself after a reconnect."""
        while True:
            try:
                async for message in pubsub.listen():
                    if message.get("type") == "message" and isinstance(doc := entries.parse(message["data"]), dict):
                        self._send(entries.sse("window", doc))
            except RedisError as exc:
                self._send(entries.problem(exc))
                await asyncio.sleep(_RETRY_S)

    async def _ticks(self) -> None:
        """The counters and late counts every TICK_S; the browser charts rates from their deltas."""
        while True:
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.hgetall(self._keys.counters)
                    pipe.hgetall(self._keys.late)
                    counters, late = await pipe.execute()
                self._send(entries.sse("tick", {"t": entries.now_ms(), "counters": entries.ints(counters),
                                                "late": entries.ints(late)}))
            except RedisError as exc:
                self._send(entries.problem(exc))
            await asyncio.sleep(TICK_S)


async def _stream_end(client: aioredis.Redis, stream: str) -> str:
    """The id of the stream's newest entry ("0-0" when empty): XREAD after it sees only what comes next."""
    newest = await client.xrevrange(stream, count=1)
    return str(newest[0][0]) if newest else "0-0"


def _entry_id(text: str) -> EntryId:
    millis, _, seq = text.partition("-")
    return int(millis), int(seq or 0)

