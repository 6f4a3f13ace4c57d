"""OffsetTracker: commit only what is finished, whatever order events complete in."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.kafka.offsets import TP, OffsetTracker

A: TP = ("events", 0)
B: TP = ("events", 1)


def oracle(tracked: list[int], finished: set[int]) -> int:
    """Brute force: lowest unfinished offset, or one past the highest when all are finished."""
    unfinished = [o for o in tracked if o not in finished]
    return min(unfinished) if unfinished else max(tracked) + 1


@st.composite
def completion_runs(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Strictly increasing offsets (with gaps, as after compaction) and a random completion order."""
    gaps = draw(st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=60))
    start = draw(st.integers(min_value=0, max_value=1000))
    offsets = [start + sum(gaps[: i + 1]) for i in range(len(gaps))]
    order = draw(st.permutations(offsets))
    return offsets, list(order)


@given(completion_runs())
def test_commit_point_never_passes_an_unfinished_event(run: tuple[list[int], list[int]]) -> None:
    offsets, order = run
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.track(A, offset)
    finished: set[int] = set()
    committed = tracker.committable()[A]
    tracker.mark_committed({A: committed})
    for offset in order:
        tracker.done(A, offset)
        finished.add(offset)
        got = tracker.committable().get(A)
        if got is not None:
            assert got != committed
            committed = got
            tracker.mark_committed({A: got})
        assert committed == oracle(offsets, finished)
        assert tracker.in_flight(A) == len(offsets) - len(finished)


@given(completion_runs())
def test_commit_points_are_monotonic_and_reach_last_plus_one(run: tuple[list[int], list[int]]) -> None:
    offsets, order = run
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.track(A, offset)
    commits: list[int] = []
    for offset in order:
        tracker.done(A, offset)
        point = tracker.committable().get(A)
        if point is not None:
            commits.append(point)
            tracker.mark_committed({A: point})
    assert commits == sorted(set(commits))
    assert commits[-1] == offsets[-1] + 1
    assert tracker.in_flight() == 0


@given(completion_runs(), st.data())
def test_interleaved_tracking_and_completion_match_the_oracle(
    run: tuple[list[int], list[int]], data: st.DataObject
) -> None:
    offsets, _ = run
    tracker = OffsetTracker()
    tracked: list[int] = []
    finished: set[int] = set()
    for offset in offsets:
        tracker.track(A, offset)
        tracked.append(offset)
        open_ = [o for o in tracked if o not in finished]
        for done in data.draw(st.lists(st.sampled_from(open_), unique=True)):
            tracker.done(A, done)
            finished.add(done)
        assert tracker.committable() == {A: oracle(tracked, finished)}


def test_nothing_is_committable_before_anything_is_tracked() -> None:
    assert OffsetTracker().committable() == {}


def test_a_tracked_but_unfinished_event_holds_the_commit_point_at_itself() -> None:
    tracker = OffsetTracker()
    tracker.track(A, 5)
    assert tracker.committable() == {A: 5}


def test_only_partitions_whose_commit_point_moved_are_reported() -> None:
    tracker = OffsetTracker()
    tracker.track(A, 0)
    tracker.track(B, 0)
    tracker.mark_committed(tracker.committable())
    assert tracker.committable() == {}
    tracker.done(B, 0)
    assert tracker.committable() == {B: 1}


def test_done_is_idempotent_and_ignores_unknown_offsets() -> None:
    tracker = OffsetTracker()
    tracker.track(A, 0)
    tracker.track(A, 1)
    tracker.done(A, 1)
    tracker.done(A, 1)
    tracker.done(A, 7)
    tracker.done(B, 0)
    assert tracker.committable() == {A: 0}
    assert tracker.in_flight() == 1


@pytest.mark.parametrize("second", [3, 2])
def test_non_increasing_offsets_are_rejected(second: int) -> None:
    tracker = OffsetTracker()
    tracker.track(A, 3)
    with pytest.raises(ValueError, match="strictly increase"):
        tracker.track(A, second)


def test_offsets_must_increase_even_after_everything_finished() -> None:
    tracker = OffsetTracker()
    tracker.track(A, 3)
    tracker.done(A, 3)
    with pytest.raises(ValueError):
        tracker.track(A, 3)


def test_negative_offsets_are_rejected() -> None:
    with pytest.raises(ValueError):
        OffsetTracker().track(A, -1)


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    tracker.track(A, 10)
    tracker.track(B, 0)
    tracker.done(A, 10)
    assert tracker.committable() == {A: 11, B: 0}
    assert tracker.in_flight(A) == 0
    assert tracker.in_flight(B) == 1
    assert tracker.in_flight() == 1


def test_forget_returns_final_commit_points_and_drops_the_partition() -> None:
    tracker = OffsetTracker()
    for offset in range(3):
        tracker.track(A, offset)
    tracker.track(B, 0)
    tracker.done(A, 0)
    assert tracker.forget([A]) == {A: 1}
    assert tracker.in_flight(A) == 0
    assert tracker.committable() == {B: 0}
    tracker.done(A, 1)
    assert A not in tracker.committable()


def test_forget_omits_partitions_whose_commit_point_did_not_move() -> None:
    tracker = OffsetTracker()
    tracker.track(A, 0)
    tracker.mark_committed({A: 0})
    assert tracker.forget([A, B]) == {}


def test_a_forgotten_partition_can_be_tracked_afresh_from_any_offset() -> None:
    tracker = OffsetTracker()
    tracker.track(A, 50)
    tracker.forget([A])
    tracker.track(A, 10)
    assert tracker.committable() == {A: 10}


def test_an_event_with_held_parts_is_done_only_when_every_part_is():
    tracker = OffsetTracker()
    tracker.track(A, 0)
    assert tracker.hold(A, 0, parts=2)
    tracker.done(A, 0)
    tracker.done(A, 0)
    assert tracker.committable() == {A: 0}
    tracker.done(A, 0)
    assert tracker.committable() == {A: 1}
    assert not tracker.hold(A, 0)
