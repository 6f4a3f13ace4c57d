"""The window stage's paned plan: each pane summarised once, each window one combine over its panes,
late events revising their pane for the windows still open, offsets released exactly as the plain plan
does. Writer and Redis are stand-ins (tests/unit/test_window_stage_revoke.py's); the pool is a stand-in
that answers each summary request with a label naming its texts, so the prompts can be read back."""

from __future__ import annotations

from collections import Counter
from typing import Any

from streamer.config import Route
from streamer.contracts import WindowResult
from streamer.engine.requests import GenRequest, GenResult
from streamer.kafka.offsets import OffsetTracker
from streamer.outcomes import Sealer
from streamer.pipeline.window_stage import WindowStage
from streamer.windows.content import WindowItem
from tests.unit.test_window_stage_revoke import TOPIC, Outcomes, SlowRedis

SLIDE_MS, SIZE_MS = 1000, 3000


class Summariser:
    """The model: answers `[texts joined by +]`, and keeps every prompt's texts."""

    model_name = "stand-in"

    def __init__(self) -> None:
        self.prompts: list[list[str]] = []

    async def generate(self, request: GenRequest) -> Any:
        body = request.messages[-1]["content"].split("\n")[1:]
        texts = [line.removeprefix("- ") for line in body]
        self.prompts.append(texts)
        text = "[" + "+".join(texts) + "]"
        return type("Generated", (), {"result": GenResult(text, tokens_in=len(texts), tokens_out=1)})


def stage(pool: Summariser, writer: Outcomes, tracker: OffsetTracker, redis: Any = None, **window: Any) -> WindowStage:
    route = Route.model_validate({"name": "w", "input": TOPIC, "task": "none", "window": {
        "kind": "sliding", "size_ms": SIZE_MS, "slide_ms": SLIDE_MS, "idle_timeout_ms": 60_000, "task": "summarize",
        "output": "win", **window}})
    if redis is None:
        redis = SlowRedis()
        redis.release.set()
    windows = WindowStage(route, pool, writer, tracker, redis, Sealer(1_000_000, "dlq"))  # type: ignore[arg-type]
    windows.watermarks.assign([(TOPIC, 0), (TOPIC, 1)], now_ms=0)
    return windows


def feed(windows: WindowStage, tracker: OffsetTracker, events: list[tuple[str, int]], first_offset: int,
         partition: int = 0) -> list[bool]:
    refs = [tracker.track((TOPIC, partition), first_offset + n) for n in range(len(events))]
    taken = [windows.add(WindowItem(text, ts_ms, "k", 4), ref, now_ms=1)
             for (text, ts_ms), ref in zip(events, refs, strict=True)]
    for ref in refs:
        tracker.done(ref)
    return taken


def summaries(writer: Outcomes) -> dict[tuple[int, int], tuple[int, str | None]]:
    records = [outcome.record for outcome in writer.added]
    assert all(isinstance(r, WindowResult) and r.final for r in records)
    return {(r.window.start, r.window.end): (r.count, r.summary) for r in records if isinstance(r, WindowResult)}


def released(writer: Outcomes) -> Counter[int]:
    """How many window results release each offset (the writer marks each part done once written)."""
    return Counter(ref.offset for outcome in writer.added for ref in outcome.releases)


async def test_each_pane_is_summarised_once_and_each_window_combines_its_panes_in_order() -> None:
    pool, writer, tracker = Summariser(), Outcomes(), OffsetTracker()
    windows = stage(pool, writer, tracker)
    feed(windows, tracker, [("a", 100), ("b", 1100), ("c", 1200), ("d", 2500), ("flush", 9000)], 0)
    windows.tick(now_ms=2)
    await windows.drain()
    assert summaries(writer) == {
        (-2000, 1000): (1, "[a]"),  # one pane: its summary as it is, no combine
        (-1000, 2000): (3, "[[a]+[b+c]]"),
        (0, 3000): (4, "[[a]+[b+c]+[d]]"),
        (1000, 4000): (3, "[[b+c]+[d]]"),
        (2000, 5000): (1, "[d]"),
    }
    pane_prompts = [p for p in pool.prompts if not p[0].startswith("[")]
    assert sorted(pane_prompts) == [["a"], ["b", "c"], ["d"]], "three panes, each summarised once"
    assert windows.model_calls == len(pool.prompts) == 3 + 3 and windows.prompt_tokens == 1 + 2 + 1 + 2 + 3 + 2
    assert released(writer) == {0: 3, 1: 3, 2: 3, 3: 3}, "each event's part in each of its windows, once"


async def test_a_late_event_revises_its_pane_for_the_windows_still_open_and_counts_in_them_only() -> None:
    pool, writer, tracker = Summariser(), Outcomes(), OffsetTracker()
    windows = stage(pool, writer, tracker, allowed_lateness_ms=0)
    feed(windows, tracker, [("a", 100), ("b", 1500)], 0)
    windows.tick(now_ms=2)  # the watermark (1500) closes [-2000, 1000)
    await windows.drain()
    assert feed(windows, tracker, [("late a", 200), ("flush", 9000)], 2) == [True, True]
    windows.tick(now_ms=3)
    await windows.drain()
    assert summaries(writer) == {
        (-2000, 1000): (1, "[a]"),  # closed before "late a" came: it does not hold it
        (-1000, 2000): (3, "[[[a]+late a]+[b]]"),  # pane [0, 1000) revised: its summary plus the late text
        (0, 3000): (3, "[[[a]+late a]+[b]]"),  # shares the revision: no second summary of it
        (1000, 4000): (1, "[b]"),
    }
    assert sorted(p for p in pool.prompts if len(p) < 3 and "+" not in "".join(p)) == [
        ["[a]", "late a"], ["a"], ["b"]], "each pane version summarised once"
    assert released(writer) == {0: 3, 1: 3, 2: 2}, "the late event holds a part in the two windows it joined"


async def test_a_combine_over_more_panes_than_max_events_folds_them_in_runs_first() -> None:
    pool, writer, tracker = Summariser(), Outcomes(), OffsetTracker()
    windows = stage(pool, writer, tracker, max_events=2)
    feed(windows, tracker, [("a", 100), ("b", 1100), ("c", 2100), ("flush", 9000)], 0)
    windows.tick(now_ms=2)
    await windows.drain()
    assert summaries(writer)[(0, 3000)] == (3, "[[[a]+[b]]+[c]]")
    assert max(len(prompt) for prompt in pool.prompts) == 2


async def test_panes_false_keeps_the_plain_plan_one_summary_of_each_windows_texts() -> None:
    pool, writer, tracker = Summariser(), Outcomes(), OffsetTracker()
    windows = stage(pool, writer, tracker, panes=False)
    feed(windows, tracker, [("a", 100), ("b", 1100), ("flush", 9000)], 0)
    windows.tick(now_ms=2)
    await windows.drain()
    assert summaries(writer) == {(-2000, 1000): (1, "[a]"), (-1000, 2000): (2, "[a+b]"), (0, 3000): (2, "[a+b]"),
                                 (1000, 4000): (1, "[b]")}
    assert windows.model_calls == 4


async def test_a_replay_of_windows_emitted_before_a_crash_summarises_only_the_fresh_ones() -> None:
    class EmittedBefore:
        async def windows_final(self, ids: list[str]) -> list[bool]:
            return [True] * len(ids)

    pool, writer, tracker = Summariser(), Outcomes(), OffsetTracker()
    windows = stage(pool, writer, tracker, EmittedBefore())
    feed(windows, tracker, [("a", 100), ("b", 1100), ("flush", 1500)], 0)
    windows.tick(now_ms=2)  # closes [-2000, 1000): its result exists, so only its offsets are released
    await windows.drain()
    assert writer.added == [] and pool.prompts == []


async def test_a_partition_revoked_and_replayed_rebuilds_its_panes_each_text_summarised_once() -> None:
    pool, writer, tracker = Summariser(), Outcomes(), OffsetTracker()
    windows = stage(pool, writer, tracker)
    windows.watermarks.revoke([(TOPIC, 1)])
    events = [("a", 100), ("b", 1100)]
    feed(windows, tracker, events, 0)
    tracker.forget([(TOPIC, 0)])
    windows.revoke([(TOPIC, 0)])  # its open windows and their panes go; the replay starts at offset 0
    windows.watermarks.assign([(TOPIC, 0)], now_ms=1)
    feed(windows, tracker, [*events, ("flush", 9000)], 0)
    windows.tick(now_ms=2)
    await windows.drain()
    assert summaries(writer)[(0, 3000)] == (2, "[[a]+[b]]")
    assert sorted(p for p in pool.prompts if not p[0].startswith("[")) == [["a"], ["b"]]


async def test_a_revoke_takes_its_events_out_of_a_route_wide_pane_the_rest_stays() -> None:
    pool, writer, tracker = Summariser(), Outcomes(), OffsetTracker()
    windows = stage(pool, writer, tracker, per_key=False)
    feed(windows, tracker, [("from 0", 100)], 0, partition=0)
    feed(windows, tracker, [("from 1", 200), ("flush", 9000)], 0, partition=1)
    tracker.forget([(TOPIC, 0)])
    windows.revoke([(TOPIC, 0)])
    windows.tick(now_ms=2)
    await windows.drain()
    assert summaries(writer)[(-2000, 1000)] == (1, "[from 1]")
    assert ["from 0"] not in pool.prompts


async def test_a_revoke_before_the_tick_leaves_a_window_the_watermark_passed_its_kept_texts() -> None:
    """Found by review (fails on the code before the fix): a route-wide pane rebuilt at a revoke was judged
    by the watermark of the revoke; [-2000, 1000), which the watermark (1500) had passed but the next tick had
    not expired yet, still held "y" and was emitted with count 1 and a summary of no texts at all."""
    pool, writer, tracker = Summariser(), Outcomes(), OffsetTracker()
    windows = stage(pool, writer, tracker, per_key=False)
    feed(windows, tracker, [("x0", 100)], 0, partition=0)
    feed(windows, tracker, [("y", 200)], 0, partition=1)
    feed(windows, tracker, [("x1", 1500)], 1, partition=0)
    feed(windows, tracker, [("z", 1600), ("w", 2500)], 1, partition=1)  # "w" placed under 1500
    tracker.forget([(TOPIC, 0)])
    windows.revoke([(TOPIC, 0)])
    feed(windows, tracker, [("flush", 9000)], 3, partition=1)
    windows.tick(now_ms=2)
    await windows.drain()
    assert summaries(writer)[(-2000, 1000)] == (1, "[y]")
    assert [] not in pool.prompts, "no summary of nothing"


async def test_a_revoke_while_a_window_is_emitted_takes_the_lost_texts_out_of_its_summary_too() -> None:
    """Found by review (fails on the code before the fix): a route-wide window closed and waiting to be emitted
    when a partition was revoked lost that partition's events (`drop_from`: its count said 1), but the pane
    versions it had sealed still held their texts, so its summary told of "x0", which the partition's next
    owner replays and summarises again. The plain plan's summary was "[y]"."""
    pool, writer, tracker = Summariser(), Outcomes(), OffsetTracker()
    redis = SlowRedis()
    windows = stage(pool, writer, tracker, redis, per_key=False)
    feed(windows, tracker, [("x0", 100)], 0, partition=0)
    feed(windows, tracker, [("y", 200)], 0, partition=1)
    feed(windows, tracker, [("x1", 1500)], 1, partition=0)
    feed(windows, tracker, [("z", 1600)], 1, partition=1)
    windows.tick(now_ms=2)  # closes [-2000, 1000); its emission waits for Redis
    await redis.reading.wait()
    tracker.forget([(TOPIC, 0)])
    windows.revoke([(TOPIC, 0)])
    redis.release.set()
    await windows.drain()
    assert summaries(writer) == {(-2000, 1000): (1, "[y]")}
    assert not any("x0" in text for prompt in pool.prompts for text in prompt)
