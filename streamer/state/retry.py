"""Backoff for Redis calls: retried while Redis is unavailable, for ever or until a budget is spent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from streamer.state.redis import StateUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def backoff_s(attempt: int) -> float:
    """The pause before retry number `attempt` (from 0): growing, then 5 s between tries."""
    return BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]


async def retrying(what: str, action: Callable[[], Awaitable[T]], give_up_s: float | None = None,
                   waiting: Callable[[bool], None] = lambda _: None) -> T:
    """Run a Redis action until it succeeds, backing off while Redis is unavailable; with `give_up_s`,
    raise the last StateUnavailable once that long has passed (a caller that must not wait for ever).
    `waiting(True)` hears when it starts backing off, `waiting(False)` when that is over."""
    loop = asyncio.get_running_loop()
    attempt = 0
    began_s = loop.time()
    try:
        while True:
            try:
                return await action()
            except StateUnavailable as exc:
                pause = backoff_s(attempt)
                if give_up_s is not None and loop.time() - began_s + pause > give_up_s:
                    raise
                log.warning("%s failed (%s); retrying in %.1f s", what, exc, pause)
                waiting(True)
                await asyncio.sleep(pause)
                attempt += 1
    finally:
        if attempt:
            waiting(False)
