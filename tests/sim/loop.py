"""An asyncio event loop on virtual time: the simulation runs the pipeline's real coroutines (writers,
window emission, backoffs) deterministically, and years of backoff cost nothing.

The loop's clock is a number the loop advances itself: when nothing is ready, "waiting for I/O" means
jumping to the next timer. There is no I/O; a loop with nothing ready and no timer would wait for
ever, which here is an error (the simulation stalled).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")
_BUSY = 100_000  # loop iterations in a row without time passing that count as spinning


class Stalled(AssertionError):
    """Nothing is ready and nothing is scheduled: real code would wait for ever."""


class _TimeSelector(selectors.BaseSelector):
    """select() does no I/O: it moves the loop's clock by the timeout it is asked to wait."""

    def __init__(self) -> None:
        self._keys: dict[int, selectors.SelectorKey] = {}
        self.loop: VirtualLoop | None = None
        self._spins = 0  # iterations in a row that let no time pass

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise Stalled("nothing is ready and no timer is set")
        assert self.loop is not None
        self._spins = self._spins + 1 if timeout <= 0 else 0
        if self._spins > _BUSY:
            raise Stalled("callbacks keep making each other ready and time never passes: a busy loop")
        self.loop.now_s += max(timeout, 0.0)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys


class VirtualLoop(asyncio.SelectorEventLoop):
    """Time starts at 0 (small numbers keep float steps exact enough; add an epoch for wall time)."""

    def __init__(self) -> None:
        self.now_s = 0.0
        selector = _TimeSelector()
        super().__init__(selector)
        selector.loop = self
        self._clock_resolution = 1e-6  # asyncio runs timers due within it; the default is below a float step

    def time(self) -> float:
        return self.now_s

    def settle(self) -> None:
        """Run everything ready now (and whatever that makes ready), without letting time pass."""
        for _ in range(_BUSY):
            due = self._scheduled and self._scheduled[0].when() <= self.now_s  # type: ignore[attr-defined]
            if not self._ready and not due:  # type: ignore[attr-defined]
                return
            self.call_soon(self.stop)
            self.run_forever()
        raise Stalled("callbacks keep making each other ready and time never passes: a busy loop")

    def advance(self, seconds: float) -> None:
        """Let `seconds` of virtual time pass, running every timer due on the way."""
        self.call_at(self.now_s + seconds, self.stop)
        self.run_forever()
        self.settle()

    def jump(self, seconds: float) -> None:
        """Let `seconds` pass at once, as for a process the OS did not run meanwhile: every timer due
        fires once, late (a periodic task does not run once per period it missed)."""
        self.now_s += seconds
        self.settle()

    def call(self, action: Callable[[], T]) -> T:
        """Run a plain function inside the loop (tasks it creates need a running loop), then settle."""

        async def inside() -> T:
            return action()

        result = self.run_until_complete(inside())
        self.settle()
        return result
