"""Window engine: every event counted in exactly the windows a brute-force oracle says, late ones flagged.

Streams are random: keys, timestamps drifting forward with jitter both inside and beyond the allowed
lateness, and arrival in list order. The watermark is one partition's highest event time minus the
lateness, advanced after each event; `expire` runs at random points. The oracles recompute from the
events alone, never from the engine's structures.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.windows.assign import Window, WindowSpec, covering
from streamer.windows.engine import OpenWindow, WindowEngine, drop_from
from streamer.windows.model import key_order
from tests.aggregators import CountAggregator, TextStatsAggregator
from tests.list_aggregator import ListAggregator

KEYS = ["a", "b", "c", None]  # None: messages without a key, which must still sort


@dataclass(frozen=True)
class Event:
    key: str | None
    ts_ms: int
    ref: int


@dataclass
class Run:
    """A stream in arrival order, the lateness behind the watermark, and when `expire` is called."""

    events: list[Event]
    lateness_ms: int
    expire_after: list[bool] = field(default_factory=list)

    def watermarks(self) -> list[int | None]:
        """The watermark each event is added under: highest ts before it, minus the lateness."""
        marks: list[int | None] = []
        high = None
        for event in self.events:
            marks.append(None if high is None else high - self.lateness_ms)
            high = event.ts_ms if high is None else max(high, event.ts_ms)
        return marks

    def final_watermark_ms(self) -> int:
        return max(e.ts_ms for e in self.events) - self.lateness_ms if self.events else 0


@st.composite
def runs(draw: st.DrawFn, max_jitter_ms: int = 60) -> Run:
    """Timestamps drift forward; each is pulled back by up to `max_jitter_ms`, often past the lateness."""
    steps = draw(st.lists(st.integers(min_value=0, max_value=8), max_size=60))
    events, base = [], 0
    for ref, step in enumerate(steps):
        base += step
        jitter = draw(st.integers(min_value=-max_jitter_ms, max_value=5))
        events.append(Event(draw(st.sampled_from(KEYS)), max(0, base + jitter), ref))
    lateness_ms = draw(st.integers(min_value=0, max_value=40))
    expire_after = draw(st.lists(st.booleans(), min_size=len(events), max_size=len(events)))
    return Run(events, lateness_ms, expire_after)


grid_specs = st.one_of(
    st.builds(WindowSpec.tumbling, st.integers(min_value=1, max_value=40)),
    st.integers(min_value=1, max_value=40).flatmap(
        lambda size: st.builds(WindowSpec.sliding, st.just(size), st.integers(min_value=1, max_value=size))
    ),
)


def brute_covering(spec: WindowSpec, ts_ms: int) -> list[Window]:
    """Every multiple of the step that starts a window containing ts, found by trying each integer."""
    size, step = spec.size_ms or 0, spec.step_ms
    return [Window(s, s + size) for s in range(ts_ms - size - step, ts_ms + 1) if s % step == 0 and ts_ms < s + size]


def closing_order(window: OpenWindow[Any]) -> tuple[int, tuple[bool, Any], int]:
    return (window.window.end_ms, key_order(window.key), window.window.start_ms)


def summary(window: OpenWindow[Any]) -> tuple[int, list[int], int, int, list[int]]:
    return (window.count, sorted(window.refs), window.first_ts_ms, window.last_ts_ms, sorted(window.state))


# --- assignment -----------------------------------------------------------------------------------


@given(grid_specs, st.integers(min_value=0, max_value=10_000))
def test_an_event_is_in_every_window_that_covers_it_and_no_other(spec: WindowSpec, ts_ms: int) -> None:
    windows = covering(spec, ts_ms)
    assert windows == brute_covering(spec, ts_ms)
    assert windows == sorted(windows)
    assert all(w.end_ms - w.start_ms == spec.size_ms for w in windows)


def test_tumbling_is_sliding_with_slide_equal_to_size() -> None:
    for ts_ms in (0, 1, 59_999, 60_000, 123_456):
        assert covering(WindowSpec.tumbling(60_000), ts_ms) == covering(WindowSpec.sliding(60_000, 60_000), ts_ms)
    assert covering(WindowSpec.tumbling(60_000), 61_000) == [Window(60_000, 120_000)]


def test_sliding_windows_start_every_slide_aligned_to_the_epoch() -> None:
    assert covering(WindowSpec.sliding(60_000, 20_000), 65_000) == [
        Window(20_000, 80_000),
        Window(40_000, 100_000),
        Window(60_000, 120_000),
    ]


@pytest.mark.parametrize(
    "kind, fields",
    [
        ("tumbling", {}),
        ("tumbling", {"size_ms": 0}),
        ("sliding", {"size_ms": 60}),
        ("sliding", {"size_ms": 60, "slide_ms": 0}),
        ("sliding", {"size_ms": 60, "slide_ms": 61}),
        ("session", {"size_ms": 60}),
        ("session", {"gap_ms": -1}),
        ("hopping", {"size_ms": 60}),
    ],
)
def test_a_spec_missing_what_its_kind_needs_is_rejected(kind: Any, fields: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        WindowSpec(kind, **fields)


def test_fields_a_kind_does_not_use_are_ignored() -> None:
    assert WindowSpec("session", size_ms=0, slide_ms=0, gap_ms=5).gap_ms == 5
    assert WindowSpec("tumbling", size_ms=10, slide_ms=10, gap_ms=0).step_ms == 10


# --- tumbling and sliding against the oracle ------------------------------------------------------


def grid_oracle(spec: WindowSpec, run: Run) -> tuple[list[bool], dict[tuple[Any, Window], list[Event]]]:
    """From the events alone: late iff every covering window ended at or before the event's watermark."""
    late, members = [], defaultdict(list)
    for event, mark in zip(run.events, run.watermarks(), strict=True):
        open_windows = [w for w in brute_covering(spec, event.ts_ms) if mark is None or w.end_ms > mark]
        late.append(not open_windows)
        for window in open_windows:
            members[(event.key, window)].append(event)
    return late, members


def drive(engine: WindowEngine[Any, int], run: Run) -> tuple[list[bool], list[list[OpenWindow[Any]]]]:
    """Feed the run; returns late flags and each `expire` call's windows (the last call closes all)."""
    late, batches = [], []
    for event, mark, expire in zip(run.events, run.watermarks(), run.expire_after, strict=True):
        added = engine.add(event.key, event.ts_ms, event.ref, event.ref, mark)
        late.append(added.late)
        if expire:
            batches.append(engine.expire(mark))
    batches.append(engine.expire(run.final_watermark_ms() + 10**6))
    return late, batches


def expected_summary(events: list[Event]) -> tuple[int, list[int], int, int, list[int]]:
    refs = sorted(e.ref for e in events)
    return (len(events), refs, min(e.ts_ms for e in events), max(e.ts_ms for e in events), refs)


@pytest.mark.parametrize("keep_events", [True, False])
@given(grid_specs, runs())
def test_every_in_time_event_is_counted_in_exactly_its_windows(keep_events: bool, spec: WindowSpec, run: Run) -> None:
    engine: WindowEngine[list[int], int] = WindowEngine(spec, ListAggregator(), keep_events=keep_events)
    late, batches = drive(engine, run)
    expected_late, members = grid_oracle(spec, run)
    assert late == expected_late
    emitted = [w for batch in batches for w in batch]
    got = {(w.key, w.window): summary(w) for w in emitted}
    assert len(got) == len(emitted), "a window was emitted twice"
    assert got == {kw: expected_summary(events) for kw, events in members.items()}
    assert engine.open_count() == 0


@given(grid_specs, runs())
def test_windows_close_in_end_order_as_soon_as_the_watermark_reaches_their_end(spec: WindowSpec, run: Run) -> None:
    engine: WindowEngine[int, int] = WindowEngine(spec, CountAggregator())
    held_end_ms: dict[tuple[Any, Window], int] = {}
    for event, mark, expire in zip(run.events, run.watermarks(), run.expire_after, strict=True):
        for window in engine.add(event.key, event.ts_ms, event.ref, event.ref, mark).windows:
            held_end_ms[(event.key, window)] = window.end_ms
        if expire:
            closed = engine.expire(mark)
            assert closed == sorted(closed, key=closing_order)
            due = {kw for kw, end_ms in held_end_ms.items() if mark is not None and end_ms <= mark}
            assert {(w.key, w.window) for w in closed} == due
            for kw in due:
                del held_end_ms[kw]
            assert engine.open_count() == len(held_end_ms)


@given(grid_specs, runs())
def test_peek_shows_a_keys_open_windows_with_everything_so_far(spec: WindowSpec, run: Run) -> None:
    engine: WindowEngine[list[int], int] = WindowEngine(spec, ListAggregator())
    so_far = Run([], run.lateness_ms)
    for event, mark in zip(run.events, run.watermarks(), strict=True):
        engine.add(event.key, event.ts_ms, event.ref, event.ref, mark)
        so_far.events.append(event)
        _, members = grid_oracle(spec, so_far)
        expected = sorted(
            (w, expected_summary(evs))
            for (k, w), evs in members.items()
            if k == event.key and (mark is None or w.end_ms > mark)
        )
        assert [(w.window, summary(w)) for w in engine.peek(event.key)] == expected


def test_a_late_event_changes_nothing_and_a_closed_window_never_reopens() -> None:
    engine: WindowEngine[int, int] = WindowEngine(WindowSpec.tumbling(10), CountAggregator())
    engine.add("k", 5, 0, "r0", None)
    [closed] = engine.expire(10)
    assert (closed.window, closed.count) == (Window(0, 10), 1)
    assert engine.add("k", 7, 0, "r1", None).late, "the engine remembers the watermark it was given"
    assert engine.add("k", 8, 0, "r2", 3).late, "a lower watermark does not reopen the window"
    assert engine.expire(100) == []


def test_an_event_near_the_watermark_joins_only_its_windows_still_open() -> None:
    engine: WindowEngine[int, int] = WindowEngine(WindowSpec.sliding(30, 10), CountAggregator())
    added = engine.add("k", 25, 0, "r", 30)
    assert not added.late
    assert added.windows == (Window(10, 40), Window(20, 50)), "[0, 30) covers 25 too but is closed"


def test_text_stats_track_length_min_max_and_sum() -> None:
    @dataclass
    class Doc:
        text: str

    engine: WindowEngine[Any, Doc] = WindowEngine(WindowSpec.session(10), TextStatsAggregator())
    for ts_ms, text in [(0, "abc"), (20, "a"), (10, "abcdef")]:  # the last one bridges two sessions
        engine.add("k", ts_ms, Doc(text), ts_ms, None)
    [window] = engine.expire(100)
    stats = window.state
    assert (stats.events, stats.min_len, stats.max_len, stats.sum_len) == (3, 1, 6, 10)
    assert window.window == Window(0, 30)


# --- sessions against the oracle ------------------------------------------------------------------


@dataclass
class OracleSession:
    key: Any
    events: list[Event]

    @property
    def window(self) -> Window:
        return Window(min(e.ts_ms for e in self.events), max(e.ts_ms for e in self.events) + GAP_MS)


GAP_MS = 10


def session_oracle(run: Run) -> tuple[list[bool], list[list[OracleSession]]]:
    """The session rules executed naively on event lists: late flags and each expire call's sessions."""
    live: list[OracleSession] = []
    late: list[bool] = []
    batches: list[list[OracleSession]] = []
    for event, mark, expire in zip(run.events, run.watermarks(), run.expire_after, strict=True):
        wm = -(10**9) if mark is None else mark
        lo, hi = event.ts_ms, event.ts_ms + GAP_MS
        touching = [
            s
            for s in live
            if s.key == event.key and s.window.end_ms > wm and s.window.start_ms <= hi and lo <= s.window.end_ms
        ]
        late.append(not touching and hi <= wm)
        if not late[-1]:
            live = [s for s in live if s not in touching]
            live.append(OracleSession(event.key, [event] + [e for s in touching for e in s.events]))
        if expire:
            batches.append([s for s in live if s.window.end_ms <= wm])
            live = [s for s in live if s.window.end_ms > wm]
    batches.append(live)
    return late, batches


def closed_summary(batch: list[OracleSession]) -> list[tuple[Any, Window, list[int]]]:
    """An oracle batch as (key, window, refs), in the order the engine must emit it."""
    rows = [(s.key, s.window, sorted(e.ref for e in s.events)) for s in batch]
    return sorted(rows, key=lambda r: (r[1].end_ms, key_order(r[0]), r[1].start_ms))


@pytest.mark.parametrize("keep_events", [True, False])
@given(runs())
def test_sessions_merge_and_close_exactly_as_the_oracle_says(keep_events: bool, run: Run) -> None:
    engine: WindowEngine[list[int], int] = WindowEngine(WindowSpec.session(GAP_MS), ListAggregator(),
                                                        keep_events=keep_events)
    late, batches = drive(engine, run)
    expected_late, expected_batches = session_oracle(run)
    assert late == expected_late
    assert len(batches) == len(expected_batches)
    for got, want in zip(batches, expected_batches, strict=True):
        assert [(w.key, w.window, sorted(w.refs)) for w in got] == closed_summary(want)
        assert got == sorted(got, key=closing_order)
        for window in got:
            assert sorted(window.state) == sorted(window.refs), "states merged with the events they hold"
            assert window.count == len(window.refs)
    assert engine.open_count() == 0


@given(runs())
def test_without_a_watermark_sessions_are_runs_of_events_less_than_a_gap_apart(run: Run) -> None:
    engine: WindowEngine[int, int] = WindowEngine(WindowSpec.session(GAP_MS), CountAggregator())
    for event in run.events:
        assert not engine.add(event.key, event.ts_ms, event.ref, event.ref, None).late
    got = {(w.key, w.window.start_ms, w.window.end_ms, w.count) for w in engine.expire(10**9)}
    expected = set()
    for key in KEYS:
        stamps = sorted(e.ts_ms for e in run.events if e.key == key)
        groups: list[list[int]] = []
        for ts in stamps:
            if groups and ts - groups[-1][-1] <= GAP_MS:
                groups[-1].append(ts)
            else:
                groups.append([ts])
        expected |= {(key, g[0], g[-1] + GAP_MS, len(g)) for g in groups}
    assert got == expected


def test_events_exactly_a_gap_apart_share_a_session() -> None:
    engine: WindowEngine[int, int] = WindowEngine(WindowSpec.session(10), CountAggregator())
    engine.add("k", 0, 0, "a", None)
    assert engine.add("k", 10, 0, "b", None).windows == (Window(0, 20),)
    assert engine.add("k", 21, 0, "c", None).windows == (Window(21, 31),)


def test_a_closed_proto_session_is_not_late_when_it_merges_with_an_open_one() -> None:
    engine: WindowEngine[int, int] = WindowEngine(WindowSpec.session(10), CountAggregator())
    engine.add("k", 18, 0, "a", None)
    assert engine.add("k", 9, 0, "b", 20).windows == (Window(9, 28),), "[9, 19) is closed but touches [18, 28)"
    assert engine.add("k", 0, 0, "c", 20).windows == (Window(0, 28),)
    assert engine.add("k", 40, 0, "d", 20).windows == (Window(40, 50),)
    assert engine.add("j", 5, 0, "e", 20).late
    assert [(w.window, w.count) for w in engine.peek("k")] == [(Window(0, 28), 3), (Window(40, 50), 1)]


def test_an_engine_that_does_not_keep_events_cannot_drop_some_but_can_be_emptied() -> None:
    """One engine per partition goes whole with its partition; only an engine across partitions
    (per_key: false) must take some events out and rebuild the rest."""
    engine: WindowEngine[list[int], int] = WindowEngine(WindowSpec.tumbling(10), ListAggregator(), keep_events=False)
    engine.add("k", 1, 1, ("p0", 1), None)
    with pytest.raises(ValueError, match="keeps its events"):
        engine.drop(lambda ref: ref[0] == "p0")
    [closing] = engine.expire(10)
    assert drop_from(closing, ListAggregator(), lambda ref: ref[0] == "p0") == 1 and closing.count == 0


def test_a_key_that_never_pauses_gets_sessions_no_longer_than_the_maximum() -> None:
    """Review finding 18: a session on a key with no gap (a heartbeat) never closed, and held its
    partition's offsets uncommitted for ever. With a maximum it closes, and the next session starts."""
    engine: WindowEngine[int, int] = WindowEngine(WindowSpec.session(10, max_duration_ms=100), CountAggregator())
    for ts_ms in range(0, 250, 5):
        engine.add("k", ts_ms, 0, ts_ms, ts_ms - 1)
    closed = engine.expire(250)
    assert [(w.window, w.count) for w in closed] == [(Window(0, 100), 20), (Window(100, 200), 20)]
    assert [(w.window, w.count) for w in engine.peek("k")] == [(Window(200, 255), 10)]


def test_an_early_event_shortens_what_a_capped_session_may_reach_and_it_closes_on_time() -> None:
    engine: WindowEngine[int, int] = WindowEngine(WindowSpec.session(50, max_duration_ms=100), CountAggregator())
    engine.add("k", 100, 0, "a", None)
    assert engine.add("k", 140, 0, "b", None).windows == (Window(100, 190),)
    assert engine.add("k", 60, 0, "c", None).windows == (Window(60, 160),), "capped at 60 + 100"
    assert engine.expire(159) == []
    assert [w.count for w in engine.expire(160)] == [3], "closed at its shortened end, not at 190"


def test_touching_sessions_merge_only_while_the_merged_one_stays_short_enough() -> None:
    engine: WindowEngine[int, int] = WindowEngine(WindowSpec.session(10, max_duration_ms=40), CountAggregator())
    engine.add("k", 0, 0, "a", None)
    engine.add("k", 20, 0, "b", None)
    engine.add("k", 40, 0, "c", None)  # three sessions: [0, 10), [20, 30), [40, 50)
    assert engine.add("k", 10, 0, "d", None).windows == (Window(0, 30),), "bridges the first two: span 20"
    assert engine.add("k", 30, 0, "e", None).windows == (Window(0, 40),), "the bridge to 40 would span 40: not merged"
    assert sorted((w.window, w.count) for w in engine.peek("k")) == [(Window(0, 40), 4), (Window(40, 50), 1)]


def test_a_session_may_not_be_shorter_than_its_gap() -> None:
    with pytest.raises(ValueError, match="max_duration_ms"):
        WindowSpec.session(100, max_duration_ms=50)
