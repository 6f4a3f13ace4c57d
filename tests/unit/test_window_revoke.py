"""Revoked partitions leave the windows: a replay from the committed offset then counts every event once.

Keys are not tied to partitions here, so one window holds events of several partitions and a revoke
must take out exactly the revoked partition's events. Refs are (partition, offset), as in the app.
The committed offset is the OffsetTracker's rule: the lowest offset still held by a window not yet
emitted (everything below it is fully written).
"""

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.windows.assign import WindowSpec
from streamer.windows.content import ContentAggregator, LabelSlot, WindowItem
from streamer.windows.engine import OpenWindow, WindowEngine, drop_from
from tests.list_aggregator import ListAggregator

KEYS = ["a", "b", None]
PARTITIONS = [0, 1, 2]
GAP_MS = 10

Ref = tuple[int, int]


@dataclass(frozen=True)
class Event:
    key: str | None
    ts_ms: int
    ref: Ref

    @property
    def partition(self) -> int:
        return self.ref[0]


@st.composite
def streams(draw: st.DrawFn) -> list[Event]:
    """Events over three partitions (offsets rising per partition), times drifting forward with jitter."""
    steps = draw(st.lists(st.integers(min_value=0, max_value=8), min_size=1, max_size=50))
    events, base, offsets = [], 0, Counter[int]()
    for step in steps:
        base += step
        partition = draw(st.sampled_from(PARTITIONS))
        ts_ms = max(0, base + draw(st.integers(min_value=-30, max_value=5)))
        events.append(Event(draw(st.sampled_from(KEYS)), ts_ms, (partition, offsets[partition])))
        offsets[partition] += 1
    return events


specs = st.one_of(
    st.builds(WindowSpec.tumbling, st.integers(min_value=1, max_value=40)),
    st.integers(min_value=1, max_value=40).flatmap(
        lambda size: st.builds(WindowSpec.sliding, st.just(size), st.integers(min_value=1, max_value=size))
    ),
    st.just(WindowSpec.session(GAP_MS)),
)
grid_specs = st.one_of(
    st.builds(WindowSpec.tumbling, st.integers(min_value=1, max_value=40)),
    st.integers(min_value=1, max_value=40).flatmap(
        lambda size: st.builds(WindowSpec.sliding, st.just(size), st.integers(min_value=1, max_value=size))
    ),
)


def engine(spec: WindowSpec) -> WindowEngine[list[Ref], Ref]:
    return WindowEngine(spec, ListAggregator())


def add(windows: WindowEngine[list[Ref], Ref], event: Event, watermark_ms: int | None = None) -> int:
    """Add one event; returns the windows it joined (0: late)."""
    return len(windows.add(event.key, event.ts_ms, event.ref, event.ref, watermark_ms).windows)


def results(closed: list[OpenWindow[list[Ref]]]) -> Counter[tuple[Any, ...]]:
    """Emitted windows as comparable rows; a Counter, so a window emitted twice shows."""
    return Counter(
        (w.key, w.window, w.count, tuple(sorted(w.refs)), w.first_ts_ms, w.last_ts_ms, tuple(sorted(w.state)))
        for w in closed
    )


def held_refs(windows: WindowEngine[list[Ref], Ref], keys: list[str | None]) -> Counter[Ref]:
    """Every ref the open windows hold, once per window holding it (the OffsetTracker's parts)."""
    return Counter(ref for key in keys for w in windows.peek(key) for ref in w.refs)


def lost_partition(partition: int) -> Any:
    return lambda ref: ref[0] == partition


# --- without a watermark: a revoke and its replay change nothing -----------------------------------


@given(specs, streams(), st.data())
def test_revoking_a_partition_and_replaying_it_gives_the_windows_built_without_the_revoke(
    spec: WindowSpec, events: list[Event], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=len(events)))
    revoked = data.draw(st.sampled_from(PARTITIONS))
    plain, revoking = engine(spec), engine(spec)
    for event in events:
        add(plain, event)
    for event in events[:cut]:
        add(revoking, event)
    revoking.drop(lost_partition(revoked))
    for event in [e for e in events[:cut] if e.partition == revoked] + events[cut:]:  # replay, then the rest
        add(revoking, event)
    assert revoking.open_count() == plain.open_count()
    assert results(revoking.expire(10**9)) == results(plain.expire(10**9))


@given(specs, streams())
def test_a_partition_revoked_for_good_leaves_exactly_the_windows_of_the_others(
    spec: WindowSpec, events: list[Event]
) -> None:
    revoking, others = engine(spec), engine(spec)
    revoked_adds = []
    for event in events:
        added = revoking.add(event.key, event.ts_ms, event.ref, event.ref, None)
        if event.partition == 0:
            revoked_adds.append(added)
        else:
            add(others, event)
    assert revoking.drop(lost_partition(0)) == sum(len(a.windows) for a in revoked_adds)
    assert revoking.open_count() == others.open_count()
    assert results(revoking.expire(10**9)) == results(others.expire(10**9))


# --- with a watermark and windows closing: offsets and counts stay exact ----------------------------


@given(specs, streams(), st.data())
def test_a_revoke_takes_out_every_part_of_the_partition_and_no_part_of_the_others(
    spec: WindowSpec, events: list[Event], data: st.DataObject
) -> None:
    """The OffsetTracker holds one part per (event, window): after the revoke the windows must hold
    the still-owned events exactly as often as before, or their offsets commit early or never."""
    windows, high = engine(spec), None
    for event in events:
        add(windows, event, None if high is None else high - data.draw(st.integers(min_value=0, max_value=30)))
        high = event.ts_ms if high is None else max(high, event.ts_ms)
        if data.draw(st.booleans()):
            windows.expire(high - 30)
    windows.expire(windows.watermark_ms)  # hand over what is closed: every window left is open
    before = held_refs(windows, KEYS)
    windows.drop(lost_partition(1))
    # a session may split into an open part and one already closed, which the next expire hands over
    after = held_refs(windows, KEYS) + Counter(ref for w in windows.expire(windows.watermark_ms) for ref in w.refs)
    assert after == Counter({ref: n for ref, n in before.items() if ref[0] != 1})


@given(grid_specs, streams(), st.data())
def test_after_a_revoke_mid_stream_and_a_replay_from_the_committed_offset_no_event_counts_twice(
    spec: WindowSpec, events: list[Event], data: st.DataObject
) -> None:
    """Windows close all along. Still-owned partitions' events end in exactly the windows they would
    have without the revoke; the revoked partition's events in a subset of theirs, once each: a
    replayed event misses only windows that closed before its replay (it is late for those)."""
    cut = data.draw(st.integers(min_value=0, max_value=len(events)))
    lateness = data.draw(st.integers(min_value=0, max_value=30))
    expire_after = data.draw(st.lists(st.booleans(), min_size=len(events), max_size=len(events)))

    def run(revoke: bool) -> Counter[tuple[Any, Any, Ref]]:
        windows, high = engine(spec), None
        emitted: list[OpenWindow[list[Ref]]] = []
        joined: dict[Ref, set[tuple[Any, Any]]] = {}  # the windows each event holds a part in

        def place(event: Event, mark: int | None) -> None:
            added = windows.add(event.key, event.ts_ms, event.ref, event.ref, mark)
            joined[event.ref] = {(event.key, window) for window in added.windows}

        for i, event in enumerate(events):
            mark = None if high is None else high - lateness
            if revoke and i == cut:
                written = {(w.key, w.window) for w in emitted}
                unwritten = [e.ref[1] for e in events[:cut] if e.partition == 0 and joined[e.ref] - written]
                windows.drop(lost_partition(0))
                if unwritten:  # replay from the committed offset: the lowest event not fully written
                    for replayed in events[:cut]:
                        if replayed.partition == 0 and replayed.ref[1] >= min(unwritten):
                            place(replayed, mark)
            place(event, mark)
            high = event.ts_ms if high is None else max(high, event.ts_ms)
            if expire_after[i]:
                emitted += windows.expire(high - lateness)
        emitted += windows.expire(10**9)
        return Counter((w.key, w.window, ref) for w in emitted for ref in w.refs)

    plain, revoked = run(False), run(True)
    assert max(revoked.values(), default=1) == 1, "an event counted twice in one window"
    assert {k: n for k, n in revoked.items() if k[2][0] != 0} == {k: n for k, n in plain.items() if k[2][0] != 0}
    assert set(revoked) <= set(plain)


# --- content: a rebuilt window keeps labels that already came ----------------------------------------


def test_a_window_rebuilt_after_its_events_labels_came_counts_them_again() -> None:
    aggregator = ContentAggregator(keep_texts=False, keep_keys=False)
    windows: WindowEngine[Any, WindowItem] = WindowEngine(WindowSpec.tumbling(100), aggregator)
    labelled, pending = LabelSlot(), LabelSlot()
    windows.add("k", 1, WindowItem("great", 1, "k", 0, labelled), (0, 0), None)
    windows.add("k", 2, WindowItem("fine", 2, "k", 0, pending), (1, 0), None)
    windows.add("k", 3, WindowItem("awful", 3, "k", 0, LabelSlot()), (2, 0), None)
    labelled.resolve("positive")
    windows.drop(lost_partition(2))
    pending.resolve("neutral")
    [window] = windows.expire(10**9)
    assert window.count == 2
    assert window.state.labels == {"positive": 1, "neutral": 1}
    assert not window.state.slots, "no label of the rebuilt window is still awaited"


# --- a window already closing when its partition goes ------------------------------------------------


@pytest.mark.parametrize("spec", [WindowSpec.tumbling(100), WindowSpec.session(GAP_MS)])
def test_a_closed_window_not_yet_emitted_loses_the_revoked_events_but_keeps_its_bounds(spec: WindowSpec) -> None:
    windows = engine(spec)
    for event in [Event("k", 1, (0, 0)), Event("k", 5, (1, 0)), Event("k", 9, (0, 1))]:
        add(windows, event)
    [closing] = windows.expire(10**9)
    bounds = closing.window
    assert drop_from(closing, ListAggregator(), lost_partition(0)) == 2
    assert (closing.window, closing.count, closing.refs, closing.state) == (bounds, 1, [(1, 0)], [(1, 0)])
    assert (closing.first_ts_ms, closing.last_ts_ms) == (5, 5)
    drop_from(closing, ListAggregator(), lost_partition(1))
    assert closing.count == 0 and closing.refs == [], "emptied: the stage emits nothing"


def test_a_session_bridged_only_by_revoked_events_splits_into_the_sessions_of_the_rest() -> None:
    windows = engine(WindowSpec.session(GAP_MS))
    for event in [Event("k", 0, (0, 0)), Event("k", 8, (1, 0)), Event("k", 16, (0, 1))]:
        add(windows, event)
    windows.drop(lost_partition(1))
    assert sorted((w.window.start_ms, w.window.end_ms, w.count) for w in windows.expire(10**9)) == [
        (0, GAP_MS, 1), (16, 16 + GAP_MS, 1)]
