"""Answers reused on replay: an event whose answer Redis already holds is answered with those bytes, not
by the model.

Replays after a crash or a rebalance, and producers that send an event twice, ask again what was asked
before. The answer outcome's Redis script keeps each answer's exact bytes under (route, event id) with a
digest of everything that shaped it (`digest`); an event whose digest matches is answered from there.
A changed event (text, task, params, key, meta), prompt, route setting or model has another digest: a
miss, answered afresh.

Look-ups stay off the consume loop's path: the events of one poll are looked up together, in one
round trip, in a task of their own. Until an event is answered from Redis or handed to the model it
counts against the room the loop polls for (`pending`), so the model's queue is never overrun. Redis
away or slow (past `LOOKUP_TIMEOUT_S`) is a miss for the whole batch: the model answers, nothing waits
for Redis and nothing is dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from streamer.contracts import InputEvent
from streamer.engine.backend import Backend
from streamer.engine.requests import Request
from streamer.state.redis import StateUnavailable, Stored

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_S = 1.0
"""A look-up slower than this is a miss: a model call costs less than an event held up by a slow Redis."""


_LATER_FIELDS = frozenset({"schema"})
"""Request fields added after answers were first kept: left out of the digest while unset, so a deploy that adds
one does not make every kept answer miss (the uncommitted tail after the restart would be asked again)."""


def digest(model: str, route: str, task: str, request: Request, event: InputEvent) -> str | None:
    """What an answer depends on, hashed: the model, the route and task, the very request the model gets
    (its prompt, built from the text and every route setting and template that shapes it; its token cap,
    temperature or labels), and what the answer copies from the event (key, meta). Not the event's time
    or place: a replay or a producer's second send is the same question. None: the event cannot be
    hashed (a value JSON cannot hold), so its answer is not kept."""
    fields = {name: value for name, value in dataclasses.asdict(request).items()
              if not (name in _LATER_FIELDS and value is None)}
    doc = [model, route, task, type(request).__name__, fields, event.key, event.meta]
    try:
        return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()
    except (TypeError, ValueError):
        return None


class AnswerStore(Protocol):
    """Where kept answers are read (`streamer.state.redis.RedisState`)."""

    async def stored_answers(self, wanted: Sequence[tuple[str, str]]) -> list[Stored | None]: ...


@dataclass(frozen=True)
class Lookup:
    """One event waiting for its look-up, and its two ways on."""

    route: str
    event_id: str
    digest: str
    hit: Callable[[Stored], bool]
    """Answer the event from the kept answer; False: the answer cannot be used (the model answers)."""
    miss: Callable[[], None]
    """Hand the event to the model (called only with a free slot)."""


@dataclass
class Reuse:
    """Batches the look-ups of one poll into one round trip, off the consume loop."""

    store: AnswerStore
    pool: Backend
    timeout_s: float = LOOKUP_TIMEOUT_S
    failure: BaseException | None = None
    """A bug in a look-up's continuation: the pipeline stops with it rather than lose the event."""
    _batch: list[Lookup] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _pending: int = 0

    @property
    def pending(self) -> int:
        """Events asked about and not yet answered from Redis or handed to the model."""
        return self._pending

    def ask(self, lookup: Lookup) -> None:
        self._batch.append(lookup)
        self._pending += 1

    def flush(self) -> None:
        """Look up what was asked since the last flush (the consume loop calls it once per poll)."""
        if not self._batch:
            return
        task = asyncio.get_running_loop().create_task(self._resolve(self._batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._batch = []

    async def drain(self) -> None:
        """Every event asked about answered from Redis or handed to the model (the shutdown's step 3). A
        look-up that died is not raised again here: the consume loop raised it (`failure`), and the
        shutdown still writes and commits what is done."""
        self.flush()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _resolve(self, batch: list[Lookup]) -> None:
        found = await self._find(batch)
        try:
            for lookup, stored in zip(batch, found, strict=True):
                if stored is None or stored.digest != lookup.digest or not lookup.hit(stored):
                    while self.pool.free_slots() <= 0:  # a window's summary may have taken the slot meanwhile
                        await self.pool.wait_for_room()
                    lookup.miss()
                self._pending -= 1
        except Exception as exc:
            self.failure = exc
            raise

    async def _find(self, batch: list[Lookup]) -> list[Stored | None]:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.store.stored_answers([(lookup.route, lookup.event_id) for lookup in batch])
        except (StateUnavailable, TimeoutError):  # Redis away or slow: the model answers; the writer waits it out
            return [None] * len(batch)
        except Exception:  # Redis refused otherwise (an ACL without HMGET, say): said, and answered anyway
            log.warning("looking up %d kept answers failed; the model answers them", len(batch), exc_info=True)
            return [None] * len(batch)
