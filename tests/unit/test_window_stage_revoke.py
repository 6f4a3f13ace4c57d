"""The window stage on a revoke: the partition's events leave open and closing windows and its
watermark goes, so the replay from the committed offset counts them once. Writer, Redis and pool
are stand-ins; the OffsetTracker is the real one."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from streamer.config import Route
from streamer.contracts import WindowResult
from streamer.kafka.offsets import OffsetTracker
from streamer.outcomes import Outcome, Sealer
from streamer.pipeline.window_stage import WindowStage
from streamer.windows.content import WindowItem

TOPIC = "in"
SIZE_MS = 1000


class Outcomes:
    """The writer: keeps what the stage hands over."""

    def __init__(self) -> None:
        self.added: list[Outcome] = []

    def add(self, outcome: Outcome) -> None:
        self.added.append(outcome)

    def results(self) -> list[tuple[str | None, int, list[tuple[Any, int]]]]:
        rows = []
        for outcome in self.added:
            assert isinstance(outcome.record, WindowResult)
            rows.append((outcome.record.key, outcome.record.count, sorted((r.tp, r.offset) for r in outcome.releases)))
        return sorted(rows, key=lambda row: str(row[0]))


class SlowRedis:
    """`windows_final` waits until released: a revoke can land while windows are being emitted."""

    def __init__(self) -> None:
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def windows_final(self, ids: list[str]) -> list[bool]:
        self.reading.set()
        await self.release.wait()
        return [False] * len(ids)


def stage(writer: Outcomes, state: Any, tracker: OffsetTracker, *, per_key: bool = True,
          mixed: list[str] | None = None) -> WindowStage:
    route = Route.model_validate({"name": "w", "input": TOPIC, "task": "none", "window": {
        "kind": "tumbling", "size_ms": SIZE_MS, "idle_timeout_ms": 60_000, "per_key": per_key, "output": "win"}})
    pool = SimpleNamespace(worker=SimpleNamespace(name="none"))
    on_mixed = (mixed if mixed is not None else []).append
    return WindowStage(route, pool, writer, tracker, state, Sealer(1_000_000, "dlq"), on_mixed)  # type: ignore[arg-type]


def feed(windows: WindowStage, tracker: OffsetTracker, events: list[tuple[int, int, str, int]], now_ms: int) -> None:
    """(partition, offset, key, ts) each, as the event handler does for task `none`."""
    windows.refresh(now_ms)
    for partition, offset, key, ts_ms in events:
        ref = tracker.track((TOPIC, partition), offset)
        assert windows.add(WindowItem(f"event {offset}", ts_ms, key, 0), ref, now_ms)
        tracker.done(ref)


async def test_a_revoke_while_windows_are_emitted_takes_the_partitions_events_out_of_them() -> None:
    writer, redis, tracker = Outcomes(), SlowRedis(), OffsetTracker()
    windows = stage(writer, redis, tracker, per_key=False)  # one window across keys: both partitions in it
    windows.watermarks.assign([(TOPIC, 0), (TOPIC, 1)], now_ms=0)
    feed(windows, tracker, [(0, 0, "a", 10), (1, 0, "b", 20), (0, 1, "a", 30), (0, 2, "a", 2500), (1, 1, "b", 2600)],
         now_ms=1)
    windows.tick(now_ms=2)  # the watermark (2500) closes [0, 1000)
    await asyncio.wait_for(redis.reading.wait(), 5)
    tracker.forget([(TOPIC, 0)])  # what KafkaSource does first on a revoke
    windows.revoke([(TOPIC, 0)])
    redis.release.set()
    await windows.drain()
    assert writer.results() == [(None, 1, [((TOPIC, 1), 0)])]
    assert windows.open_windows == 1, "[2000, 3000) stays open with partition 1's event only"


async def test_a_window_left_empty_by_a_revoke_emits_nothing() -> None:
    writer, redis, tracker = Outcomes(), SlowRedis(), OffsetTracker()
    windows = stage(writer, redis, tracker)
    windows.watermarks.assign([(TOPIC, 0), (TOPIC, 1)], now_ms=0)
    feed(windows, tracker, [(0, 0, "a", 10), (1, 0, "b", 20), (0, 1, "a", 2500), (1, 1, "b", 2600)], now_ms=1)
    windows.tick(now_ms=2)
    await asyncio.wait_for(redis.reading.wait(), 5)
    windows.revoke([(TOPIC, 0)])
    redis.release.set()
    await windows.drain()
    assert writer.results() == [("b", 1, [((TOPIC, 1), 0)])]


async def test_a_partition_revoked_and_assigned_again_is_replayed_into_its_open_windows_once() -> None:
    writer, redis, tracker = Outcomes(), SlowRedis(), OffsetTracker()
    redis.release.set()
    windows = stage(writer, redis, tracker)
    windows.watermarks.assign([(TOPIC, 0)], now_ms=0)
    events = [(0, 0, "a", 10), (0, 1, "a", 20), (0, 2, "a", 30)]
    feed(windows, tracker, events, now_ms=1)
    assert tracker.commit_points() == {(TOPIC, 0): 0}, "an open window holds its events uncommitted"
    tracker.forget([(TOPIC, 0)])  # lost (session timeout), then assigned again
    windows.revoke([(TOPIC, 0)])
    windows.watermarks.assign([(TOPIC, 0)], now_ms=2)
    feed(windows, tracker, [*events, (0, 3, "a", 5000)], now_ms=3)  # the replay from offset 0, then more
    windows.tick(now_ms=4)
    await windows.drain()
    assert writer.results() == [("a", 3, [((TOPIC, 0), 0), ((TOPIC, 0), 1), ((TOPIC, 0), 2)])]


def test_a_revoked_partition_no_longer_holds_the_watermark_back() -> None:
    windows = stage(Outcomes(), SlowRedis(), OffsetTracker())
    tracker = OffsetTracker()
    windows.watermarks.assign([(TOPIC, 0), (TOPIC, 1)], now_ms=0)
    feed(windows, tracker, [(0, 0, "a", 100), (1, 0, "b", 5000)], now_ms=1)
    windows.revoke([(TOPIC, 0)])
    windows.refresh(now_ms=2)
    assert windows.watermarks.current(2) == 5000


async def test_a_window_across_keys_fed_by_several_partitions_is_counted_as_mixed() -> None:
    """Such a window can be split by a rebalance: the metric and a warning tell the operator."""
    writer, redis, tracker, mixed = Outcomes(), SlowRedis(), OffsetTracker(), []
    redis.release.set()
    windows = stage(writer, redis, tracker, per_key=False, mixed=mixed)
    windows.watermarks.assign([(TOPIC, 0), (TOPIC, 1)], now_ms=0)
    feed(windows, tracker, [(0, 0, "a", 10), (1, 0, "b", 20), (0, 1, "a", 2500), (1, 1, "b", 2600)], now_ms=1)
    windows.tick(now_ms=2)
    await windows.drain()
    assert writer.results() == [(None, 2, [((TOPIC, 0), 0), ((TOPIC, 1), 0)])]
    assert mixed == ["w"]


async def test_per_key_windows_are_partitioned_a_key_on_two_partitions_gets_a_window_on_each() -> None:
    """Each partition's windows close by its own watermark; the partition is part of the window id."""
    writer, redis, tracker, mixed = Outcomes(), SlowRedis(), OffsetTracker(), []
    redis.release.set()
    windows = stage(writer, redis, tracker, mixed=mixed)
    windows.watermarks.assign([(TOPIC, 0), (TOPIC, 1)], now_ms=0)
    feed(windows, tracker, [(0, 0, "a", 10), (1, 0, "a", 20), (0, 1, "a", 2500)], now_ms=1)
    windows.tick(now_ms=2)  # partition 0 passed 1000; partition 1 has not: its window stays open
    await windows.drain()
    assert writer.results() == [("a", 1, [((TOPIC, 0), 0)])]
    feed(windows, tracker, [(1, 1, "a", 2600)], now_ms=3)
    windows.tick(now_ms=4)
    await windows.drain()
    assert writer.results() == [("a", 1, [((TOPIC, 0), 0)]), ("a", 1, [((TOPIC, 1), 0)])]
    assert len({outcome.record.id for outcome in writer.added}) == 2 and mixed == []


async def test_a_partition_taken_over_mid_stream_replays_into_its_own_windows_none_of_it_late() -> None:
    """The new owner's other partitions are far ahead in event time; the moved partition's backlog
    is judged by its own event time, as it was on its old owner."""
    writer, redis, tracker = Outcomes(), SlowRedis(), OffsetTracker()
    redis.release.set()
    windows = stage(writer, redis, tracker)
    windows.watermarks.assign([(TOPIC, 0)], now_ms=0)
    feed(windows, tracker, [(0, i, "a", i * 1000) for i in range(10)], now_ms=1)  # partition 0 at 9 s
    windows.tick(now_ms=2)
    windows.watermarks.assign([(TOPIC, 1)], now_ms=3, served=False)  # taken over from a dead member
    feed(windows, tracker, [(1, i, "b", 100 + i * 300) for i in range(10)], now_ms=4)  # its backlog: 0.1-2.8 s
    windows.tick(now_ms=5)
    await windows.drain()
    assert windows.late == 0
    assert ("b", 4, [((TOPIC, 1), o) for o in range(3, 7)]) in writer.results(), "[1 s, 2 s) of partition 1"


def test_a_window_of_no_key_and_one_of_the_key_none_have_two_ids() -> None:
    """Review finding 20: the id formatted the key with an f-string, so no key and the key "None" were one
    window, and Redis kept only the first's final result."""
    from streamer.pipeline.window_stage import window_id

    assert window_id("r", None, "tumbling", 0, 1000, 0) != window_id("r", "None", "tumbling", 0, 1000, 0)
    assert window_id("r", "", "tumbling", 0, 1000, 0) != window_id("r", None, "tumbling", 0, 1000, 0)
