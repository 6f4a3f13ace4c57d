"""The paned plan of a sliding `summarize` route: pane summaries made once, shared by the windows holding them.

Each pane version (streamer/windows/panes.py) is summarised once, when the first window holding it is
emitted; a window's summary is one short combine call over its panes' summaries, in time order (a
window with one pane reuses that pane's summary as it is). A revised version (late events) is
summarised as its predecessor's summary followed by its own texts. The fold rules bound every prompt:
a pane's texts fold past `max_events`/`max_tokens` like a plain window's, and a combine over more than
`max_events` summaries folds them in runs first; every prompt is cut to `max_tokens` (`budgeted`).

Offsets are not this module's business: windows hold them as in the plain plan. Pane summaries live in
memory only; a restart rebuilds the panes from the replay, which starts below every event of a window
not yet emitted, and so below every event of its panes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Hashable
from dataclasses import replace
from typing import Any

from streamer.windows.assign import WindowSpec
from streamer.windows.content import Content, ContentAggregator, WindowItem
from streamer.windows.engine import OpenWindow
from streamer.windows.model import Lost
from streamer.windows.panes import PaneStore, PaneVersion

Summary = asyncio.Task[str]
Texts = Callable[[list[str]], Awaitable[str | None]]
Digest = Callable[[list[str]], Awaitable[str]]


class PaneSummaries:
    """Pane stores per window group (an input partition, or None for a `per_key: false` route)."""

    def __init__(self, spec: WindowSpec, max_events: int, *, summarize: Texts, digest: Digest,
                 settled: Callable[[Content], Awaitable[None]]) -> None:
        """`summarize`: a model summary (None when the call failed); `digest`: one that never fails (folds
        and panes fall back to the texts themselves); `settled`: waits out the folds of a content."""
        self._spec, self._max_events = spec, max_events
        self._summarize, self._digest, self._settled = summarize, digest, settled
        self._aggregator = ContentAggregator(keep_texts=True, keep_keys=False, keep_stats=False)
        self._stores: dict[Hashable, PaneStore[Summary]] = {}
        self._sealed: dict[OpenWindow[Content], list[PaneVersion[Summary]]] = {}  # closed, not yet emitted

    def add(self, group: Hashable, key: Any, item: WindowItem, ref: Any, watermark_ms: int | None) -> Content:
        """An event its windows took under `watermark_ms`; returns the pane content it joined, for the
        caller to fold when full."""
        store = self._stores.get(group)
        if store is None:  # like the window engines: a partition's panes go whole, a route's keep their events
            store = self._stores[group] = PaneStore(self._spec, self._aggregator, keep_events=group is None)
        return store.add(key, item, ref, watermark_ms)

    def close(self, group: Hashable, closed: list[OpenWindow[Content]], watermark_ms: int | None) -> None:
        """Windows the engine just handed over, and its watermark since: note what each sees of its panes,
        then forget the panes no open window holds any more."""
        store = self._stores.get(group)
        if store is None:
            return
        for window in closed:
            self._sealed[window] = store.seen_by(window.key, window.window)
        store.forget(watermark_ms)

    def revoke(self, groups: Collection[Hashable], lost: Lost) -> None:
        """A revoked partition's panes go (per partition) or lose its events (one route-wide store)."""
        for group in groups:
            self._stores.pop(group, None)
        if None in self._stores:
            self._stores[None].drop(lost)

    def reseal(self, window: OpenWindow[Content]) -> None:
        """A closed window not yet emitted lost events to a revoke (`drop_from` rebuilt it from the rest): the
        pane versions it sealed still hold the lost texts, which their partition's next owner summarises
        again. It sees fresh versions of its own kept events instead (summarised for it alone)."""
        if window not in self._sealed:
            return
        panes: dict[int, Content] = {}
        for item in window.events:  # a route-wide engine keeps its events; a partition's window is emptied whole
            start_ms = item.ts_ms - item.ts_ms % self._spec.step_ms
            content = panes.get(start_ms)
            if content is None:
                content = panes[start_ms] = self._aggregator.create()
            self._aggregator.add(content, replace(item, slot=None))
        self._sealed[window] = [PaneVersion(panes[start_ms], 0) for start_ms in sorted(panes)]

    def release(self, windows: Collection[OpenWindow[Content]]) -> None:
        """Windows emitted (or found emitted before a crash): forget what they sealed."""
        for window in windows:
            self._sealed.pop(window, None)

    @property
    def panes(self) -> int:
        return sum(store.pane_count() for store in self._stores.values())

    async def summary(self, window: OpenWindow[Content]) -> str | None:
        """The window's summary from its panes' (each version's made once, whichever window asks first)."""
        summaries = list(await asyncio.gather(*(self._of(version) for version in self._sealed[window])))
        while len(summaries) > self._max_events:  # the combine's fold rule: runs of max_events fold first
            summaries = [await self._digest(summaries[:self._max_events]), *summaries[self._max_events:]]
        return summaries[0] if len(summaries) == 1 else await self._summarize(summaries)

    def _of(self, version: PaneVersion[Summary]) -> Summary:
        if version.job is None:
            version.job = asyncio.ensure_future(self._summarise(version))
        return version.job

    async def _summarise(self, version: PaneVersion[Summary]) -> str:
        await self._settled(version.content)
        lead = [await self._of(version.previous)] if version.previous is not None else []
        return await self._digest(lead + version.content.chronological_texts())
