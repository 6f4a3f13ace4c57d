"""Small aggregators for the window engine's tests and benchmark (`bench/windows.py`): a count, and
text-length statistics. The service folds windows with `streamer.windows.content.ContentAggregator`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class CountAggregator:
    """State is the number of events; the smallest useful aggregator and the benchmark's."""

    def create(self) -> int:
        return 0

    def add(self, state: int, event: object) -> int:
        return state + 1

    def merge(self, a: int, b: int) -> int:
        return a + b


class HasText(Protocol):
    @property
    def text(self) -> str: ...


@dataclass(slots=True)
class TextStats:
    """Events and their text lengths; min/max are None for an empty window."""

    events: int = 0
    min_len: int | None = None
    max_len: int | None = None
    sum_len: int = 0


class TextStatsAggregator:
    """Counts events and tracks min/max/sum of text length; state is mutated in place."""

    def create(self) -> TextStats:
        return TextStats()

    def add(self, state: TextStats, event: HasText) -> TextStats:
        length = len(event.text)
        state.events += 1
        state.sum_len += length
        state.min_len = length if state.min_len is None else min(state.min_len, length)
        state.max_len = length if state.max_len is None else max(state.max_len, length)
        return state

    def merge(self, a: TextStats, b: TextStats) -> TextStats:
        a.events += b.events
        a.sum_len += b.sum_len
        a.min_len = _either(min, a.min_len, b.min_len)
        a.max_len = _either(max, a.max_len, b.max_len)
        return a


def _either(choose: Callable[[int, int], int], a: int | None, b: int | None) -> int | None:
    """min or max of two optional values, ignoring None."""
    if a is None or b is None:
        return a if b is None else b
    return choose(a, b)
