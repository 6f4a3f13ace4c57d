"""streamer's batched pool inside a faust-streaming worker (optional extra: `pip install streamer[faust]`).

One `FaustPool` per Faust app: the model loads when the worker starts (in a thread, so the worker's
event loop keeps heart-beating) and the pool drains when it stops. Everything in the worker that awaits
that pool shares its batches:

- an agent with `concurrency=N` runs N coroutines over one stream; each awaits `pool.classify(...)`,
  so up to N events are scored in one batch;
- `map_batch` runs a whole `stream.take(n, within=...)` batch of calls at once;
- `FaustPool.on_window_close(handler)` is a windowed table's `on_window_close` callback that starts the
  handler as a task instead of running it inline: Faust calls the callback once per key, one after the
  other, so inline summaries would run one by one; as tasks, the keys of a closing window share batches.

Faust closes a window by wall clock, `expires` after its end, at the table's next cleanup
(`table_cleanup_interval`); a window's result is not tied to offsets, so a worker that dies while a
handler runs loses that result (streamer's own windows are at-least-once).

Importing this module needs neither faust nor torch; `FaustPool(app)` imports faust's `mode` (it ships
with faust-streaming), and the model loads only when the worker starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from streamer.errors import StreamerError

if TYPE_CHECKING:
    from streamer.api import LLMPool

log = logging.getLogger(__name__)

T = TypeVar("T")
X = TypeVar("X")

FAUST_RANGE_GAP_S = 0.1
"""Faust's window ranges are closed: a window of size s starting at t is (t, t + s - 0.1)."""


@dataclass(frozen=True)
class ClosedWindow:
    """A closed window of a Faust table, as streamer reports windows: key and half-open [start, end) in epoch ms."""

    key: Any
    start: int
    end: int

    @classmethod
    def of(cls, table_key: tuple[Any, tuple[float, float]]) -> ClosedWindow:
        """From the `(key, (start_s, end_s))` a windowed table passes to `on_window_close`."""
        key, (start_s, end_s) = table_key
        return cls(key, round(start_s * 1000), round((end_s + FAUST_RANGE_GAP_S) * 1000))


WindowHandler = Callable[["LLMPool", ClosedWindow, Any], Awaitable[None]]
"""`async def handler(pool, window, value)`: value is the table's value for that key and window."""


async def map_batch(call: Callable[[X], Awaitable[T]], items: Iterable[X]) -> list[T | StreamerError]:
    """`call` on every item at once, so the calls share batches; results in the items' order.

    Made for `async for batch in stream.take(n, within=s)`. A call that fails on purpose (a
    StreamerError, e.g. GenerationError) is returned in its item's place, so one bad item does not
    cost the batch; any other exception is a bug and propagates.
    """
    results = await asyncio.gather(*(call(item) for item in items), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, StreamerError):
            raise result
    return results  # type: ignore[return-value]  # checked above: only StreamerErrors remain as exceptions


def pool_from_config() -> LLMPool:
    """The pool `streamer run` would use: model and batching sections of $STREAMER_CONFIG (and STREAMER_* env)."""
    from streamer.api import LLMPool
    from streamer.config import load_settings

    path = os.environ.get("STREAMER_CONFIG")
    settings = load_settings(Path(path) if path else None)
    return LLMPool.from_settings(settings.model, settings.batching, settings.engine)


class FaustPool:
    """streamer's pool for one Faust app: started with the worker, shared by its agents and window callbacks."""

    def __init__(self, app: Any, load: Callable[[], LLMPool] = pool_from_config) -> None:
        """Register with `app` (a `faust.App`); `load` builds the pool (blocking: it runs in a thread)."""
        self._load = load
        self._pool: LLMPool | None = None
        self._ready = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()
        app.service(_service_class(self))

    async def ready(self) -> LLMPool:
        """The started pool, once it is. Agents start before app services, so await this before the stream."""
        await self._ready.wait()
        assert self._pool is not None
        return self._pool

    async def start(self) -> None:
        pool = await asyncio.to_thread(self._load)
        await pool.start()
        self._pool = pool
        self._ready.set()
        log.info("streamer pool ready: %s", pool.model)

    async def aclose(self) -> None:
        """Let running window handlers finish, then drain the pool."""
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self._pool is not None:
            await self._pool.aclose()

    def on_window_close(self, handler: WindowHandler) -> Callable[[Any, Any], None]:
        """A windowed table's `on_window_close`: runs `handler(pool, window, value)` as a task (see the module doc)."""

        def closed(table_key: tuple[Any, tuple[float, float]], value: Any) -> None:
            task = asyncio.ensure_future(self._handle(handler, ClosedWindow.of(table_key), value))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

        return closed

    async def _handle(self, handler: WindowHandler, window: ClosedWindow, value: Any) -> None:
        try:
            await handler(await self.ready(), window, value)
        except Exception:
            log.exception("window handler failed for %r [%d, %d)", window.key, window.start, window.end)


def _service_class(owner: FaustPool) -> type:
    """The mode.Service Faust starts with the worker (after table recovery) and stops with it."""
    from mode import Service  # faust-streaming's service framework: only needed once Faust is in use

    class StreamerPoolService(Service):
        async def on_start(self) -> None:
            await owner.start()

        async def on_stop(self) -> None:
            await owner.aclose()

    return StreamerPoolService
