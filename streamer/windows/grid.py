"""Tumbling and sliding windows: per-key aggregates on the fixed, epoch-aligned window grid.

Open windows are kept in buckets by window start, one dict of key -> OpenWindow per start, so a
bucket closes as a whole and `expire` pops buckets off a heap of starts: nothing is scanned while no
window can close. Memory is one OpenWindow per (key, window) plus one ref per (event, window), and
its time and event where the engine keeps events.

The hot path is `add`: the windows covering a timestamp depend only on its slot of
gcd(step, size) ms, so each slot's windows, buckets and `Added` answer are computed once and cached
while all its windows are open; events then cost one dict lookup per window they join.
"""

import heapq
from dataclasses import dataclass
from typing import Any, Generic

from streamer.windows.assign import Window, WindowSpec, boundary_ms, covering
from streamer.windows.model import (
    LATE,
    Added,
    Aggregator,
    E,
    Lost,
    OpenWindow,
    S,
    WatermarkFloor,
    key_order,
    refold,
)

_Bucket = dict[Any, OpenWindow[S]]


@dataclass(slots=True)
class _Slot(Generic[S]):
    """The cached windows of one gcd(step, size) slot; valid while its earliest window is open."""

    pairs: tuple[tuple[Window, _Bucket[S]], ...]
    first_end_ms: int
    added: Added


class GridWindows(WatermarkFloor, Generic[S, E]):
    """Tumbling or sliding windows per key; see `WindowEngine` for the contract."""

    def __init__(self, spec: WindowSpec, aggregator: Aggregator[S, E], keep_events: bool = True) -> None:
        if spec.kind == "session" or spec.size_ms is None:
            raise ValueError("GridWindows takes tumbling or sliding specs")
        self.spec = spec
        self._aggregator = aggregator
        self._keep_events = keep_events
        self._fold = aggregator.add  # bound once: the hot loop calls it per (event, window)
        self._size_ms = spec.size_ms
        self._unit_ms = boundary_ms(spec)
        self._buckets: dict[int, _Bucket[S]] = {}
        self._starts: list[int] = []  # heap of bucket starts: the next window to close is at [0]
        self._slots: dict[int, _Slot[S]] = {}
        self._slot_ends: list[tuple[int, int]] = []  # heap of (first window end, slot): when a slot goes stale
        super().__init__()
        self._open = 0

    def add(self, key: Any, ts_ms: int, event: E, ref: Any, watermark_ms: int | None) -> Added:
        self._advance(watermark_ms)
        slot = self._slots.get(ts_ms // self._unit_ms)
        if slot is None or slot.first_end_ms <= self._watermark_ms:
            return self._add_uncached(key, ts_ms, event, ref)
        self._join(slot.pairs, key, ts_ms, event, ref)
        return slot.added

    def expire(self, watermark_ms: int | None) -> list[OpenWindow[S]]:
        self._advance(watermark_ms)
        last_closed_start_ms = self._watermark_ms - self._size_ms
        starts = self._starts
        if not starts or starts[0] > last_closed_start_ms:
            return []
        closed: list[OpenWindow[S]] = []
        while starts and starts[0] <= last_closed_start_ms:
            bucket = self._buckets.pop(heapq.heappop(starts))
            closed.extend(bucket[key] for key in sorted(bucket, key=key_order))
        self._open -= len(closed)
        self._drop_stale_slots()
        return closed

    def open_count(self) -> int:
        return self._open

    def peek(self, key: Any) -> list[OpenWindow[S]]:
        open_after_ms = self._watermark_ms - self._size_ms
        return [
            bucket[key]
            for start_ms, bucket in sorted(self._buckets.items())
            if start_ms > open_after_ms and key in bucket
        ]

    def drop(self, lost: Lost) -> int:
        """Rebuild the windows holding lost events from the others; forget the ones left empty."""
        taken = 0
        for bucket in self._buckets.values():
            for key, open_window in list(bucket.items()):
                if open_window.holds_any(lost):
                    taken += open_window.count
                    refold(open_window, self._aggregator, open_window.members(lost))
                    taken -= open_window.count
                    if not open_window.count:
                        del bucket[key]
                        self._open -= 1
        return taken

    def _join(self, pairs: tuple[tuple[Window, _Bucket[S]], ...], key: Any, ts_ms: int, event: E, ref: Any) -> None:
        """Fold the event into its window in each bucket, creating the key's window where missing."""
        fold = self._fold
        for window, bucket in pairs:
            open_window = bucket.get(key)
            if open_window is None:
                open_window = OpenWindow(key, window, self._aggregator.create(), 0, ts_ms, ts_ms)
                bucket[key] = open_window
                self._open += 1
            open_window.state = fold(open_window.state, event)
            open_window.count += 1
            open_window.refs.append(ref)
            if self._keep_events:
                open_window.times.append(ts_ms)
                open_window.events.append(event)
            if ts_ms > open_window.last_ts_ms:
                open_window.last_ts_ms = ts_ms
            elif ts_ms < open_window.first_ts_ms:
                open_window.first_ts_ms = ts_ms

    def _add_uncached(self, key: Any, ts_ms: int, event: E, ref: Any) -> Added:
        """First event of a slot, or one near the watermark: join the covering windows still open."""
        windows = covering(self.spec, ts_ms)
        still_open = tuple(w for w in windows if w.end_ms > self._watermark_ms)
        if not still_open:
            return LATE
        pairs = tuple((window, self._bucket(window)) for window in still_open)
        added = Added(late=False, windows=still_open)
        if len(still_open) == len(windows):
            slot_n = ts_ms // self._unit_ms
            self._slots[slot_n] = _Slot(pairs, still_open[0].end_ms, added)
            heapq.heappush(self._slot_ends, (still_open[0].end_ms, slot_n))
        self._join(pairs, key, ts_ms, event, ref)
        return added

    def _bucket(self, window: Window) -> _Bucket[S]:
        bucket = self._buckets.get(window.start_ms)
        if bucket is None:
            bucket = self._buckets[window.start_ms] = {}
            heapq.heappush(self._starts, window.start_ms)
        return bucket

    def _drop_stale_slots(self) -> None:
        """Forget cached slots whose earliest window has closed; each slot is cached at most once."""
        slot_ends = self._slot_ends
        while slot_ends and slot_ends[0][0] <= self._watermark_ms:
            del self._slots[heapq.heappop(slot_ends)[1]]
