"""Panes of sliding windows (streamer/windows/panes.py): what each window sees of its panes is exactly its
events, late events included, and a pane is shared by the windows holding it, not copied."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamer.windows.assign import Window, WindowSpec
from streamer.windows.content import ContentAggregator, WindowItem
from streamer.windows.engine import WindowEngine
from streamer.windows.panes import PaneStore, PaneVersion, paned

SLIDE_MS, SIZE_MS = 100, 300
SPEC = WindowSpec.sliding(SIZE_MS, SLIDE_MS)


def store(keep_events: bool = False) -> PaneStore[Any]:
    return PaneStore(SPEC, ContentAggregator(keep_texts=True, keep_keys=False, keep_stats=False), keep_events)


def seen(versions: list[PaneVersion[Any]]) -> Counter[str]:
    """Every text a window sees through its sealed versions and the versions they revise."""
    texts: Counter[str] = Counter()
    for version in versions:
        walk: PaneVersion[Any] | None = version
        while walk is not None:
            texts.update(text for _, text, _ in walk.content.texts)
            walk = walk.previous
    return texts


def item(text: str, ts_ms: int) -> WindowItem:
    return WindowItem(text, ts_ms, "k", 1)


@pytest.mark.parametrize(("spec", "expected"), [
    (WindowSpec.sliding(600, 100), True),
    (WindowSpec.sliding(600, 600), False),  # one pane per window: nothing to share
    (WindowSpec.sliding(600, 250), False),  # windows do not hold whole panes: the plain plan
    (WindowSpec.tumbling(600), False),
    (WindowSpec.session(600), False),
])
def test_only_sliding_windows_whose_size_is_a_multiple_of_the_slide_are_paned(spec: WindowSpec, expected: bool) -> None:
    assert paned(spec) is expected


def test_a_window_sees_its_panes_in_time_order_and_the_next_window_shares_them() -> None:
    panes = store()
    for text, ts_ms in [("b", 150), ("a", 20), ("c", 260), ("d", 310)]:
        panes.add("k", item(text, ts_ms), None, None)
    first = panes.seen_by("k", Window(0, 300))
    second = panes.seen_by("k", Window(100, 400))
    assert [[t for _, t, _ in v.content.texts] for v in first] == [["a"], ["b"], ["c"]]
    assert second[:2] == first[1:], "the panes [100, 200) and [200, 300) are the same objects, not copies"
    assert panes.seen_by("other", Window(0, 300)) == []


def test_a_late_event_revises_its_pane_for_the_windows_still_open_only() -> None:
    panes = store()
    panes.add("k", item("on time", 50), None, None)
    panes.add("k", item("late", 60), None, 100)  # placed after [-200, 100) closed: [-100, 200) and [0, 300) took it
    [closed_before] = panes.seen_by("k", Window(-200, 100))
    [after] = panes.seen_by("k", Window(-100, 200))
    assert seen([closed_before]) == Counter(["on time"])
    assert after.previous is closed_before and seen([after]) == Counter(["on time", "late"])
    assert panes.seen_by("k", Window(0, 300)) == [after]


def test_panes_are_forgotten_once_their_last_window_has_closed() -> None:
    panes = store()
    panes.add("k", item("a", 50), None, None)
    panes.add("k", item("b", 150), None, None)
    panes.forget(299)
    assert panes.pane_count() == 2
    panes.forget(300)  # [0, 300) was the last window holding pane [0, 100)
    assert panes.pane_count() == 1


def test_drop_rebuilds_a_pane_from_the_events_not_lost() -> None:
    panes = store(keep_events=True)
    for n, (text, ts_ms) in enumerate([("p0", 10), ("p1", 20), ("p0 again", 30), ("p1 alone", 120)]):
        panes.add("k", item(text, ts_ms), (n % 2, n), 100 if n == 2 else None)  # "p0 again" came late
    panes.drop(lambda ref: ref[0] == 1)
    assert panes.pane_count() == 1, "pane [100, 200) held partition 1's event only"
    [rebuilt] = panes.seen_by("k", Window(0, 300))
    assert seen([rebuilt]) == Counter(["p0", "p0 again"])
    [first] = panes.seen_by("k", Window(-200, 100))
    assert rebuilt.previous is first and seen([first]) == Counter(["p0"]), "each kept event in its own version"


def test_drop_keeps_a_pane_seen_by_a_window_the_watermark_passed_but_the_engine_has_not_expired() -> None:
    """Found by review (fails on the code before the fix): drop rebuilt a pane as one version judged by the
    watermark of now, so a window the watermark had passed (not expired yet: the stage expires on its ticks)
    saw nothing of the pane although it held the pane's kept events: its summary lost their texts."""
    panes = store(keep_events=True)
    panes.add("k", item("lost", 10), (0, 0), None)
    panes.add("k", item("kept", 20), (1, 0), None)
    panes.add("k", item("later", 250), (1, 1), 150)  # the watermark passed [-200, 100) before any expire
    panes.drop(lambda ref: ref[0] == 0)
    assert [seen([v]) for v in panes.seen_by("k", Window(-200, 100))] == [Counter(["kept"])]


def test_drop_needs_the_events_kept() -> None:
    with pytest.raises(ValueError, match="keeps its events"):
        store().drop(lambda ref: True)


arrivals = st.lists(st.tuples(st.integers(0, 1500), st.sampled_from(["a", "b"]), st.booleans()), max_size=60)


@settings(max_examples=150, deadline=None)
@given(arrivals, st.integers(0, 250))
def test_every_closed_window_sees_exactly_its_own_events_through_its_panes(
    events: list[tuple[int, str, bool]], lateness_ms: int
) -> None:
    """Events come out of order (within and beyond the lateness); the watermark expires windows now and
    then, as the stage's ticks do (later than the events' own watermarks close them). Whatever a window
    took, the pane versions it sees hold: no event lost, none doubled, none that came after it closed."""
    engine: WindowEngine[Counter[str], str] = WindowEngine(SPEC, TextCounter())
    panes = store()
    high_ms: int | None = None
    checked = 0
    versions: set[int] = set()

    def close(watermark_ms: int | None) -> None:
        nonlocal checked
        for window in engine.expire(watermark_ms):
            sealed = panes.seen_by(window.key, window.window)
            assert seen(sealed) == window.state
            versions.update(id(v) for v in sealed)
            checked += 1
        panes.forget(engine.watermark_ms)

    for n, (ts_ms, key, tick) in enumerate(events):
        mark_ms = None if high_ms is None else high_ms - lateness_ms
        text = f"e{n}"
        if not engine.add(key, ts_ms, text, n, mark_ms).late:
            panes.add(key, WindowItem(text, ts_ms, key, 1), n, mark_ms)
        high_ms = ts_ms if high_ms is None else max(high_ms, ts_ms)
        if tick:
            close(high_ms - lateness_ms)
    close(10_000)
    assert engine.open_count() == 0 and panes.pane_count() == 0
    assert len(versions) <= checked * SIZE_MS // SLIDE_MS


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1500), st.sampled_from([0, 1]), st.sampled_from([False, False, True])),
                max_size=60),
       st.integers(0, 250), st.integers(0, 60))
@example([(10, 1, False), (20, 0, False), (500, 0, False), (700, 1, False), (800, 1, False)], 0, 4)  # the review's
def test_after_a_drop_every_closed_window_sees_exactly_its_kept_events(
    events: list[tuple[int, int, bool]], lateness_ms: int, drop_at: int
) -> None:
    """As above, on a route-wide store and engine keeping their events, with partition 0's events dropped at
    some point (a revoke): whatever the engine still holds and expires later, the panes show, no more."""
    engine: WindowEngine[Counter[str], str] = WindowEngine(SPEC, TextCounter())
    panes = store(keep_events=True)
    high_ms: int | None = None

    def close(watermark_ms: int | None) -> None:
        for window in engine.expire(watermark_ms):
            assert seen(panes.seen_by(window.key, window.window)) == +window.state
        panes.forget(engine.watermark_ms)

    for n, (ts_ms, partition, tick) in enumerate(events):
        if n == drop_at:
            engine.drop(lambda ref: ref[0] == 0)
            panes.drop(lambda ref: ref[0] == 0)
        mark_ms = None if high_ms is None else high_ms - lateness_ms
        text = f"e{n}"
        if not engine.add("k", ts_ms, text, (partition, n), mark_ms).late:
            panes.add("k", WindowItem(text, ts_ms, "k", 1), (partition, n), mark_ms)
        high_ms = ts_ms if high_ms is None else max(high_ms, ts_ms)
        if tick:
            close(high_ms - lateness_ms)
    close(10_000)
    assert engine.open_count() == 0 and panes.pane_count() == 0


class TextCounter:
    """The oracle: a window's texts as a multiset."""

    def create(self) -> Counter[str]:
        return Counter()

    def add(self, state: Counter[str], event: str) -> Counter[str]:
        state[event] += 1
        return state

    def merge(self, a: Counter[str], b: Counter[str]) -> Counter[str]:
        return a + b
