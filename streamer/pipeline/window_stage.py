"""A route's windows inside the running service: feeds the engine, closes windows, emits results.

Per event: the engine places it in its windows under the watermark its partition's earlier events
set (or calls it late), and each window it joined holds its offset (one part per window in the
OffsetTracker); the partition's watermark after it is noted with its offset, for the commit to
carry. When the watermark passes a window's end the window closes: its labels are awaited,
`summarize` windows get one LLM request through the model pool, and the result is written to the
window topic and Redis; only then are the held offsets released. A session's result is written only
once every event it holds is below the commit point (`in_order`), so a replay never rebuilds part
of it under another id.

Sliding `summarize` windows whose size is a multiple of their slide take the paned plan by default
(`window.panes`, streamer/pipeline/pane_summaries.py): their texts are kept per slide-long pane, each
pane is summarised once and every window combines its panes' summaries; the windows themselves keep
counts, labels and offsets exactly as in the plain plan.

Per-key windows are partitioned: one engine per input partition, closed by that partition's own
watermark (Kafka Streams keeps window state per task the same way). A window then never mixes
partitions, a partition that moves between instances takes its windows along whole (the next owner
rebuilds them from the replay, under the watermark the commit carried, so nothing turns late that
was not), and a key's windows do not wait for other partitions. A key produced to several partitions gets a window
per partition (the partition is part of the window id); keyed production makes it one.
`per_key: false` windows span partitions: one engine, closed by the route's watermark.

When partitions are revoked or lost, their events leave every window not yet emitted (`revoke`):
offsets are committed only below the lowest event of such a window, so whoever owns a partition
next, this instance included, replays those events and they count once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from streamer.clock import Clock, SystemClock
from streamer.config import Route
from streamer.contracts import TextStats, WindowBounds, WindowResult
from streamer.engine.backend import Backend
from streamer.engine.requests import GenRequest, GenResult
from streamer.kafka.offsets import TP, OffsetTracker, Ref
from streamer.outcomes import Sealer
from streamer.pipeline.pane_summaries import PaneSummaries
from streamer.pipeline.writer import WindowOutputs
from streamer.state.redis import RedisState
from streamer.state.retry import retrying
from streamer.tasks.event import TASKS
from streamer.tasks.prompts import summarize_messages
from streamer.tasks.window import WINDOW_TASKS
from streamer.windows.assign import WindowSpec
from streamer.windows.content import Content, ContentAggregator, WindowItem
from streamer.windows.engine import OpenWindow, WindowEngine, drop_from
from streamer.windows.panes import paned
from streamer.windows.watermark import Watermarks

log = logging.getLogger(__name__)


def window_id(route: str, key: str | None, kind: str, start_ms: int, end_ms: int, partition: int | None) -> str:
    """Stable across restarts and rebalances, so a replayed window is recognised (Redis) and
    deduplicated (topic key); `partition` is the input partition of a partitioned window. A key is
    tagged apart from no key, so the key "None" and no key are two windows."""
    tagged = "-" if key is None else f"k{key}"
    raw = f"{route}\x1f{tagged}\x1f{kind}\x1f{start_ms}\x1f{end_ms}\x1f{partition}".encode()
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


class WindowStage:
    def __init__(self, route: Route, pool: Backend, writer: WindowOutputs, tracker: OffsetTracker,
                 state: RedisState, sealer: Sealer, on_mixed: Callable[[str], None] = lambda route: None,
                 clock: Clock | None = None) -> None:
        """`on_mixed(route)` hears of every final window holding events of several partitions (metrics)."""
        assert route.window is not None
        self._sealer = sealer
        self._on_mixed = on_mixed
        self._clock = clock or SystemClock()
        self.route, self.window = route, route.window
        self.window_task = WINDOW_TASKS[route.window.task]
        self._pool, self._writer, self._tracker, self._state = pool, writer, tracker, state
        w = route.window
        spec = WindowSpec(kind=w.kind, size_ms=w.size_ms or 0, slide_ms=w.slide_ms or w.size_ms or 0,
                          gap_ms=w.gap_ms or 0, max_duration_ms=w.max_duration_ms)
        self._spec = spec
        self._panes = (PaneSummaries(spec, w.max_events, summarize=self._summarize_budgeted, settled=_settled,
                                     digest=lambda texts: self._digest(self._budgeted(texts)))
                       if self.window_task.summarizes and w.panes and paned(spec) else None)
        self._aggregator = ContentAggregator(keep_texts=self.window_task.summarizes and self._panes is None,
                                             keep_keys=not w.per_key, keep_stats=self.window_task.stats)
        self._engines: dict[TP | None, WindowEngine[Content, WindowItem]] = {}  # per partition; None: all
        self.watermarks: Watermarks[TP] = Watermarks(w.allowed_lateness_ms, w.idle_timeout_ms)
        self.late = 0  # late events of the route this process has seen
        self._dirty: defaultdict[str | None, int] = defaultdict(int)
        self._last_update_s = self._clock.monotonic_s()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: set[OpenWindow[Content]] = set()  # handed over by the engine, not yet to the writer
        # Provisional and final results reach the writer in the order they were made: a window's final
        # result is never followed by a provisional one (asyncio.Lock wakes its waiters in order).
        self._emitting = asyncio.Lock()
        self._failure: BaseException | None = None
        self._warned_mixed = False
        self.model_calls = 0  # summaries and folds asked of the model, and the prompt tokens it read for them
        self.prompt_tokens = 0

    @property
    def open_windows(self) -> int:
        return sum(engine.open_count() for engine in self._engines.values())

    @property
    def failure(self) -> BaseException | None:
        """The error that stopped emitting windows, if any: the pipeline stops on it rather than stall."""
        return self._failure

    def refresh(self, now_ms: int, paused: bool = False, unreachable: Collection[TP] = (),
                waiting: Collection[TP] = ()) -> None:
        """Until the next refresh, which partitions are not fetched: all while the consumer is `paused`
        (or not polled), else those it cannot fetch (`unreachable`: their leader is away, or their
        position is still being read). Their idle time stands still meanwhile. Partitions with records
        `waiting` in Kafka, not handed out yet, are not quiet: their idle time starts again."""
        self.watermarks.hold(now_ms, None if paused else unreachable)
        self.watermarks.waiting(waiting)

    def assign(self, tps: Collection[TP]) -> None:
        """Partitions now feed this route; none of them is idle before Kafka has served it."""
        self.watermarks.assign(tps, served=False)

    def restore(self, tp: TP, mark_ms: int | None) -> None:
        """The watermark the partition's last commit carried: a replay judges every event as the first run did."""
        self.watermarks.restore(tp, mark_ms)

    def revoke(self, tps: Collection[TP]) -> None:
        """Partitions went to another member or were lost: forget their watermarks and take their
        events out of every window not yet emitted; their next owner replays them."""
        gone = set(tps)

        def lost(ref: Ref) -> bool:
            return ref.tp in gone

        self.watermarks.revoke(gone)
        if self.window.per_key:
            taken = sum(self._engines.pop(tp).open_count() for tp in gone if tp in self._engines)
        else:
            taken = self._engines[None].drop(lost) if None in self._engines else 0
        for window in self._closing:
            if (dropped := drop_from(window, self._aggregator, lost)) and self._panes is not None:
                self._panes.reseal(window)  # its sealed panes hold the lost texts too
            taken += dropped
        if self._panes is not None:
            self._panes.revoke(gone, lost)
        if taken:
            log.info("route %s: %d windows (or parts) of revoked partitions dropped, their next owner replays them",
                     self.route.name, taken)

    def add(self, item: WindowItem, ref: Ref, now_ms: int) -> bool:
        """Place one event under the watermark its partition's earlier events set (per record, so
        batching changes nothing); False when it is late (all its windows closed already)."""
        tp = ref.tp
        route_ms = None if self.window.per_key else self.watermarks.current(now_ms)
        mark_ms = self.watermarks.observe(tp, item.ts_ms, now_ms)
        self._tracker.note(ref, mark_ms, self.watermarks.mark(tp))
        key = item.key if self.window.per_key else None
        group = tp if self.window.per_key else None
        engine = self._engines.get(group)
        if engine is None:  # a partition's engine never needs its events back: it goes whole
            engine = self._engines[group] = WindowEngine(self._spec, self._aggregator, keep_events=group is None)
        placed_ms = mark_ms if self.window.per_key else route_ms  # the watermark the event is placed under
        added = engine.add(key, item.ts_ms, item, ref, placed_ms)
        if added.late:
            self.late += 1
            return False
        self._tracker.hold(ref, len(added.windows))
        if self._panes is not None:
            self._maybe_fold(self._panes.add(group, key, item, ref, placed_ms))
        elif self.window_task.summarizes:
            for open_window in engine.peek(key):
                self._maybe_fold(open_window.state)
        if self.window.emit == "update":
            self._dirty[key] += 1
            if self._dirty[key] >= self.window.update_every_events:
                self._emit_updates([key])
        return True

    def tick(self, now_ms: int) -> None:
        """Close what the watermark passed; in update mode, emit provisional results on schedule."""
        partition_marks = self.watermarks.partition_marks(now_ms)
        for tp, mark_ms in partition_marks.items():  # an idle partition's moved: commits past its events carry it
            self._tracker.advance(tp, mark_ms)
        marks: dict[TP | None, int | None] = {None: self.watermarks.current(now_ms)}
        if self.window.per_key:
            marks = {tp: mark_ms for tp, mark_ms in partition_marks.items()}
        closed: list[OpenWindow[Content]] = []
        for group, engine in self._engines.items():
            expired = engine.expire(marks.get(group))
            if self._panes is not None:
                self._panes.close(group, expired, engine.watermark_ms)
            closed += expired
        if closed:
            self._closing.update(closed)
            self._spawn(self._close_all(closed))
        due_s = self._last_update_s + self.window.update_every_s
        if self.window.emit == "update" and self._clock.monotonic_s() >= due_s:
            self._emit_updates(list(self._dirty))

    async def drain(self) -> None:
        """Finish emitting the windows already closed (open ones are rebuilt from Kafka after a restart)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    def _maybe_fold(self, content: Content) -> None:
        if content.needs_fold(self.window.max_events, self.window.max_tokens):
            self._spawn(self._fold(content, content.take_for_fold()))

    async def _fold(self, content: Content, texts: list[str]) -> None:
        content.fold_done(await self._digest(texts))

    async def _digest(self, texts: list[str]) -> str:
        """A summary that never loses its texts: the model's, or (the call failed) the texts' start."""
        return await self._summarize(texts) or " ".join(texts)[:2000]

    async def _summarize_budgeted(self, texts: list[str]) -> str | None:
        return await self._summarize(self._budgeted(texts))

    async def _summarize(self, texts: list[str]) -> str | None:
        request = GenRequest(summarize_messages(texts, self.route.system_prompt),
                             max_new_tokens=self.window.summary_tokens)
        generated = await self._pool.generate(request)
        result = generated.result
        self.model_calls += 1
        if isinstance(result, GenResult):
            self.prompt_tokens += result.tokens_in
        return result.text if isinstance(result, GenResult) and result.error is None else None

    def _emit_updates(self, keys: list[str | None]) -> None:
        results = []
        for key in keys:
            self._dirty.pop(key, None)
            results += [self._result(w, final=False, summary=None) for engine in self._engines.values()
                        for w in engine.peek(key)]
        self._last_update_s = self._clock.monotonic_s()
        if results:
            self._spawn(self._emit_provisional(results))

    async def _emit_provisional(self, results: list[WindowResult]) -> None:
        """Provisional results, except for windows whose final result was written before a crash (the
        replay rebuilt them) or is still on its way to Kafka and Redis (a revoke and reassignment made
        the replay rebuild it first): on the topic it would follow the final one, and a reader keeping the
        latest record per window id (or a compacted topic) would keep a partial count for ever.

        The writer is asked before Redis is read: a final result it has finished with by then is in Redis
        when the read comes (and no final result reaches the writer meanwhile: it holds `_emitting`)."""
        async with self._emitting:
            unwritten = self._writer.unwritten_finals()
            finals = await retrying("redis read", lambda: self._state.windows_final([r.id for r in results]))
            for result, final in zip(results, finals, strict=True):
                if not final and result.id not in unwritten:
                    self._writer.add(self._sealer.seal(self.window.output, result.id.encode(), result, (),
                                                       self.route.name))

    async def _close_all(self, closed: list[OpenWindow[Content]]) -> None:
        """Emit the windows one tick closed, minus what a revoke takes out meanwhile."""
        try:
            async with self._emitting:
                await self._emit_closed(closed)
        finally:
            self._closing.difference_update(closed)
            if self._panes is not None:
                self._panes.release(closed)

    async def _emit_closed(self, closed: list[OpenWindow[Content]]) -> None:
        """One Redis read for all, summaries batched by the pool; a window a revoke emptied emits nothing."""
        # Only the unsettled are awaited: one task per closed window cost 13.5% of closing 10k count windows.
        await asyncio.gather(*(_settled(window.state) for window in closed if not window.state.settled))
        closed = [window for window in closed if window.count]  # a revoke may have emptied some
        ids = [self._id(window) for window in closed]
        finals = await retrying("redis read", lambda: self._state.windows_final(ids))
        fresh = [window for window, final in zip(closed, finals, strict=True) if not final]
        for window, final in zip(closed, finals, strict=True):
            if final:  # emitted before a crash; the replay rebuilt it: only release its offsets
                for ref in window.refs:
                    self._tracker.done(ref)
        summaries: list[str | None] = [None] * len(fresh)
        if self.window_task.summarizes:
            summaries = await asyncio.gather(*(self._window_summary(w) if w.count else _none() for w in fresh))
        for window, summary in zip(fresh, summaries, strict=True):
            if not window.count:
                continue
            if not self.window.per_key:
                self._check_partitions(window)
            result = self._result(window, final=True, summary=summary)
            self._writer.add(self._sealer.seal(self.window.output, result.id.encode(), result, tuple(window.refs),
                                               self.route.name, in_order=self.window.kind == "session"))

    async def _window_summary(self, window: OpenWindow[Content]) -> str | None:
        if self._panes is not None:
            return await self._panes.summary(window)
        return await self._summarize_budgeted(window.state.chronological_texts())

    def _check_partitions(self, window: OpenWindow[Content]) -> None:
        """Count (and warn once of) a window across keys fed by several partitions: a rebalance moving
        one of them can split it into partial results with one id on two instances."""
        partitions = {ref.tp for ref in window.refs}
        if len(partitions) < 2:
            return
        self._on_mixed(self.route.name)
        if not self._warned_mixed:
            self._warned_mixed = True
            log.warning("route %s: window %s (per_key: false) holds events of %d partitions; a rebalance "
                        "can split it into partial results. Give such a route a one-partition input topic "
                        "(see README, Windows).", self.route.name, self._id(window), len(partitions))

    def _budgeted(self, texts: list[str]) -> list[str]:
        """Keep the newest texts that fit the token budget (roughly 4 characters a token)."""
        kept: list[str] = []
        budget = self.window.max_tokens * 4
        for text in reversed(texts):
            budget -= len(text)
            if budget < 0 and kept:
                break
            kept.append(text)
        return kept[::-1]

    def _id(self, window: OpenWindow[Content]) -> str:
        partition = window.refs[0].tp[1] if self.window.per_key else None  # partitioned: one partition's events
        return window_id(self.route.name, window.key, self.window.kind, window.window.start_ms, window.window.end_ms,
                         partition)

    def _result(self, window: OpenWindow[Content], *, final: bool, summary: str | None) -> WindowResult:
        content = window.state
        return WindowResult(
            id=self._id(window), route=self.route.name, key=window.key,
            window=WindowBounds(kind=self.window.kind, start=window.window.start_ms, end=window.window.end_ms),
            count=window.count, first_ts=window.first_ts_ms, last_ts=window.last_ts_ms,
            late=self.late,
            summary=summary,
            labels=dict(content.labels) if TASKS[self.route.task].tally(self.route) is not None else None,
            stats=_stats(content) if self.window_task.stats else None,
            model=self._pool.model_name if summary is not None else None,
            final=final, emitted_at=self._clock.now_ms(),
        )


async def _settled(content: Content) -> None:
    """Wait until a window's labels have all arrived and no fold of its texts is under way."""
    if content.slots:
        resolved = asyncio.get_running_loop().create_future()
        def resolve() -> None:
            if not resolved.done():
                resolved.set_result(None)

        content.on_resolved = resolve
        await resolved
    while not content.settled_folds:
        await asyncio.sleep(0.01)


async def _none() -> None:
    return None


def _stats(content: Content) -> TextStats:
    return TextStats(chars_min=content.chars_min, chars_max=content.chars_max,
                     chars_mean=round(content.chars_sum / max(content.count, 1), 3),
                     tokens_total=content.tokens_total, distinct_keys=len(content.keys) or 1)


