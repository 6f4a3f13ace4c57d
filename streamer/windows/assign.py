"""Which event-time windows an event belongs to: the window shapes and the covering rule.

Sliding windows are windows of `size_ms` starting every `slide_ms`, aligned to the epoch,
start-inclusive and end-exclusive; an event belongs to every window that covers its timestamp, so
each event lands in `size_ms / slide_ms` windows (rounded up or down when the slide does not divide
the size). Tumbling windows are sliding windows with slide == size: exactly one window per event.
As in Flink, the earliest windows may start before the epoch; each one still has the full size.
Session windows have no fixed grid (they grow and merge per key), so they live in the engine.

Timestamps are epoch milliseconds, validated as >= 0 upstream (decoding).
"""

import math
from dataclasses import dataclass
from typing import Literal

WindowKind = Literal["tumbling", "sliding", "session"]


@dataclass(frozen=True, order=True, slots=True)
class Window:
    """The event-time interval [start_ms, end_ms); orders by start, then end."""

    start_ms: int
    end_ms: int


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """The shape of a window; `tumbling`, `sliding` and `session` build one with only what it needs.

    Fields a kind does not use are ignored (callers may pass None or 0 for them).
    """

    kind: WindowKind
    size_ms: int | None = None
    slide_ms: int | None = None
    gap_ms: int | None = None
    max_duration_ms: int | None = None  # sessions: None, unbounded

    def __post_init__(self) -> None:
        if self.kind == "session":
            gap_ms = _positive("gap_ms", self.gap_ms, self.kind)
            if self.max_duration_ms is not None and self.max_duration_ms < gap_ms:
                raise ValueError(f"session windows need max_duration_ms >= gap_ms, got {self.max_duration_ms}")
        elif self.kind == "tumbling":
            _positive("size_ms", self.size_ms, self.kind)
        elif self.kind == "sliding":
            size_ms = _positive("size_ms", self.size_ms, self.kind)
            slide_ms = _positive("slide_ms", self.slide_ms, self.kind)
            if slide_ms > size_ms:
                raise ValueError(f"sliding windows need 0 < slide_ms <= size_ms, got {slide_ms} > {size_ms}")
        else:
            raise ValueError(f"unknown window kind {self.kind!r}")

    @classmethod
    def tumbling(cls, size_ms: int) -> "WindowSpec":
        return cls("tumbling", size_ms=size_ms)

    @classmethod
    def sliding(cls, size_ms: int, slide_ms: int) -> "WindowSpec":
        return cls("sliding", size_ms=size_ms, slide_ms=slide_ms)

    @classmethod
    def session(cls, gap_ms: int, max_duration_ms: int | None = None) -> "WindowSpec":
        return cls("session", gap_ms=gap_ms, max_duration_ms=max_duration_ms)

    @property
    def step_ms(self) -> int:
        """Distance between consecutive window starts: the slide, or the size for tumbling windows."""
        if self.kind == "session":
            raise ValueError("session windows have no fixed step")
        step_ms = self.slide_ms if self.kind == "sliding" else self.size_ms
        assert step_ms is not None  # validated in __post_init__
        return step_ms


def _positive(name: str, value: int | None, kind: str) -> int:
    if value is None or value <= 0:
        raise ValueError(f"{kind} windows need {name} > 0, got {value}")
    return value


def covering(spec: WindowSpec, ts_ms: int) -> list[Window]:
    """Every tumbling or sliding window that contains `ts_ms`, ascending by start."""
    step_ms, size_ms = spec.step_ms, spec.size_ms
    assert size_ms is not None  # validated: tumbling and sliding specs have a size
    first_start = ((ts_ms - size_ms) // step_ms + 1) * step_ms  # lowest multiple of step > ts - size
    last_start = ts_ms - ts_ms % step_ms  # highest multiple of step <= ts
    return [Window(start, start + size_ms) for start in range(first_start, last_start + 1, step_ms)]


def boundary_ms(spec: WindowSpec) -> int:
    """A unit such that all timestamps of one [n * unit, (n + 1) * unit) share their windows.

    Window starts are multiples of the step and ends are starts plus the size, so every start or
    end is a multiple of gcd(step, size): the engine caches covering windows per such slot.
    """
    assert spec.size_ms is not None
    return math.gcd(spec.step_ms, spec.size_ms)
