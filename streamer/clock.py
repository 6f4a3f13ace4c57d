"""Time as the pipeline's stages read it: one seam, so the simulation (tests/sim) runs the real stages
on virtual time, and a run can be replayed from its seed."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock epoch milliseconds: event time is compared with it (idleness, skew)."""
        ...

    def monotonic_s(self) -> float:
        """Seconds on a clock that never goes back: cadences and latencies."""
        ...


class SystemClock:
    """The process's own clocks."""

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic_s(self) -> float:
        return time.monotonic()
