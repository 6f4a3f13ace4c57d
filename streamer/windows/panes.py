"""Panes: a sliding window of size S and slide s cut into S/s panes of length s, so summaries share work.

With S a multiple of s, every window [a, a + S) starts on a pane boundary and holds whole panes: the
ones starting at a, a + s, ..., a + S - s; each event lies in exactly one pane and in every window
holding that pane. So a pane is summarised once, when the first window holding it closes (that window
ends where the pane ends, so this is when the watermark passes the pane), and the up to S/s windows
holding it reuse that summary: Flink's and Scotty's slicing, applied to a model call instead of a sum.

Late events (within the allowed lateness: a window holding their pane is still open) join a pane whose
summary may exist already. The windows closed before them do not hold them; the ones still open do.
So a pane keeps versions: an event placed under a watermark that has closed more of the pane's windows
than its current version's events saw starts a new version, which revises the previous one (its
summary is the previous version's summary with the new texts, summarised again). A window sees the
last version opened before it closed. Closed-ness is judged by the watermark each event was placed
under, as the engine judges it, not by when the caller expires windows. Each version is summarised once.

A pane is forgotten once its last window has closed (watermark >= pane start + S). Pure bookkeeping:
the caller judges lateness (it adds only events some window took) and summarises (`PaneVersion.job`
holds its handle on a version's summary, made once).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from streamer.windows.assign import Window, WindowSpec
from streamer.windows.content import Content, ContentAggregator, WindowItem
from streamer.windows.model import Lost, WatermarkFloor

J = TypeVar("J")


def paned(spec: WindowSpec) -> bool:
    """Whether panes can serve a spec: sliding, its size a whole multiple (more than one) of its slide.
    Otherwise windows do not hold whole panes, and a route keeps the plain plan (a summary per window)."""
    size_ms = spec.size_ms or 0
    return spec.kind == "sliding" and size_ms > spec.step_ms and size_ms % spec.step_ms == 0


@dataclass(eq=False)
class PaneVersion(Generic[J]):
    """The texts a pane gained between two window closes; `previous` is the sealed version it revises."""

    content: Content
    closed: int  # how many of the pane's windows had closed when it opened: the later ones see it
    previous: PaneVersion[J] | None = None
    job: J | None = None  # the caller's handle on this version's summary


@dataclass(eq=False)
class _Pane(Generic[J]):
    current: PaneVersion[J]
    items: list[tuple[WindowItem, Any, int]] = field(default_factory=list)  # (event, ref, closed), for `drop`


class PaneStore(WatermarkFloor, Generic[J]):
    """The panes of one window engine's keys (one input partition's, or a `per_key: false` route's)."""

    def __init__(self, spec: WindowSpec, aggregator: ContentAggregator, keep_events: bool) -> None:
        if not paned(spec):
            raise ValueError(f"panes need a sliding spec whose size is a multiple of its slide, got {spec}")
        assert spec.size_ms is not None
        self._slide_ms, self._size_ms = spec.step_ms, spec.size_ms
        self._aggregator = aggregator
        self._keep_events = keep_events
        self._panes: dict[int, dict[Any, _Pane[J]]] = {}  # by pane start, then key
        self._starts: list[int] = []  # heap of pane starts: the next to forget is at [0]
        super().__init__()

    def add(self, key: Any, item: WindowItem, ref: Any, watermark_ms: int | None) -> Content:
        """Fold an event some window took, under the watermark the engine placed it, into its pane;
        returns the version's content (the caller folds it when full). Labels are the windows' business:
        the pane keeps texts only."""
        self._advance(watermark_ms)
        start_ms = item.ts_ms - item.ts_ms % self._slide_ms
        return self._fold(key, start_ms, item, ref, self._closed(start_ms))

    def _fold(self, key: Any, start_ms: int, item: WindowItem, ref: Any, closed: int) -> Content:
        """Fold an event into its pane's version for `closed` (a new version where more windows had closed)."""
        bucket = self._panes.get(start_ms)
        if bucket is None:
            bucket = self._panes[start_ms] = {}
            heapq.heappush(self._starts, start_ms)
        pane = bucket.get(key)
        if pane is None:
            pane = bucket[key] = _Pane(PaneVersion(self._aggregator.create(), closed))
        elif pane.current.closed < closed:
            pane.current = PaneVersion(self._aggregator.create(), closed, previous=pane.current)
        self._aggregator.add(pane.current.content, replace(item, slot=None))
        if self._keep_events:
            pane.items.append((item, ref, closed))
        return pane.current.content

    def seen_by(self, key: Any, window: Window) -> list[PaneVersion[J]]:
        """What a closed window of `key` sees of its panes, in time order (empty panes have nothing):
        each pane's last version opened before the window closed, which revises the earlier ones."""
        versions = []
        for start_ms in range(window.start_ms, window.end_ms, self._slide_ms):
            pane = self._panes.get(start_ms, {}).get(key)
            version = None if pane is None else pane.current
            while version is not None and version.closed >= (window.end_ms - start_ms) // self._slide_ms:
                version = version.previous  # opened once this window (the pane's n-th) had closed
            if version is not None:
                versions.append(version)
        return versions

    def forget(self, watermark_ms: int | None) -> None:
        """Drop the panes whose last window closed (start + S <= watermark): no window needs them again.
        Pass the engine's watermark after each `expire`, so both judge closed-ness alike."""
        self._advance(watermark_ms)
        while self._starts and self._starts[0] + self._size_ms <= self._watermark_ms:
            del self._panes[heapq.heappop(self._starts)]

    def drop(self, lost: Lost) -> None:
        """Take lost events out (a revoked partition's): a pane holding any is rebuilt from the others, each
        under the closed-ness it was placed with (so its versions are what they would have been without the
        lost events), or forgotten when none is left; windows closing later summarise it anew. Not the
        closed-ness of now: the watermark may have passed windows the engine has not expired yet, which
        hold the kept events and must still see them."""
        if not self._keep_events:
            raise ValueError("drop needs a store that keeps its events (keep_events=True)")
        for start_ms, bucket in self._panes.items():
            for key, pane in list(bucket.items()):
                if any(lost(ref) for _, ref, _ in pane.items):
                    kept = [(item, ref, closed) for item, ref, closed in pane.items if not lost(ref)]
                    del bucket[key]
                    for item, ref, closed in kept:
                        self._fold(key, start_ms, item, ref, closed)

    def _closed(self, start_ms: int) -> int:
        """How many windows holding the pane at `start_ms` the watermark has closed (they end at start + s,
        start + 2s, ..., start + S)."""
        return max(0, min((self._watermark_ms - start_ms) // self._slide_ms, self._size_ms // self._slide_ms))

    def pane_count(self) -> int:
        return sum(len(bucket) for bucket in self._panes.values())
