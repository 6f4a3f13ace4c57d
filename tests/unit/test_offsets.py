"""OffsetTracker: commit only what is finished, whatever order events complete in."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.kafka.offsets import TP, OffsetTracker, Position, Ref

A: TP = ("events", 0)
B: TP = ("events", 1)


def points(tracker: OffsetTracker) -> dict[TP, int]:
    """The offsets `positions` reports (moved since the last commit)."""
    return {tp: position.offset for tp, position in tracker.positions().items()}


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
    refs = {offset: tracker.track(A, offset) for offset in offsets}
    finished: set[int] = set()
    committed = points(tracker)[A]
    tracker.mark_committed(tracker.positions())
    for offset in order:
        tracker.done(refs[offset])
        finished.add(offset)
        got = points(tracker).get(A)
        if got is not None:
            assert got > committed
            committed = got
            tracker.mark_committed(tracker.positions())
        assert committed == oracle(offsets, finished)
        assert tracker.in_flight(A) == len(offsets) - len(finished)


@given(completion_runs())
def test_commit_points_are_monotonic_and_reach_last_plus_one(run: tuple[list[int], list[int]]) -> None:
    offsets, order = run
    tracker = OffsetTracker()
    refs = {offset: tracker.track(A, offset) for offset in offsets}
    commits: list[int] = []
    for offset in order:
        tracker.done(refs[offset])
        point = points(tracker).get(A)
        if point is not None:
            commits.append(point)
            tracker.mark_committed(tracker.positions())
    assert commits == sorted(set(commits))
    assert commits[-1] == offsets[-1] + 1
    assert tracker.in_flight() == 0


@given(completion_runs(), st.data())
def test_interleaved_tracking_and_completion_match_the_oracle(
    run: tuple[list[int], list[int]], data: st.DataObject
) -> None:
    offsets, _ = run
    tracker = OffsetTracker()
    refs: dict[int, Ref] = {}
    finished: set[int] = set()
    for offset in offsets:
        refs[offset] = tracker.track(A, offset)
        open_ = [o for o in refs if o not in finished]
        for done in data.draw(st.lists(st.sampled_from(open_), unique=True)):
            tracker.done(refs[done])
            finished.add(done)
        assert points(tracker) == {A: oracle(list(refs), finished)}


def test_nothing_is_committable_before_anything_is_tracked() -> None:
    assert OffsetTracker().positions() == {}


def test_a_tracked_but_unfinished_event_holds_the_commit_point_at_itself() -> None:
    tracker = OffsetTracker()
    tracker.track(A, 5)
    assert points(tracker) == {A: 5}


def test_only_partitions_whose_commit_point_moved_are_reported() -> None:
    tracker = OffsetTracker()
    tracker.track(A, 0)
    b = tracker.track(B, 0)
    tracker.mark_committed(tracker.positions())
    assert tracker.positions() == {}
    tracker.done(b)
    assert points(tracker) == {B: 1}


def test_done_is_idempotent_and_ignores_unknown_offsets() -> None:
    tracker = OffsetTracker()
    tracker.track(A, 0)
    one = tracker.track(A, 1)
    tracker.done(one)
    tracker.done(one)
    tracker.done(Ref(A, 7, one.epoch))
    tracker.done(Ref(B, 0, 0))
    assert points(tracker) == {A: 0}
    assert tracker.in_flight() == 1


@pytest.mark.parametrize("second", [3, 2])
def test_non_increasing_offsets_are_rejected(second: int) -> None:
    tracker = OffsetTracker()
    tracker.track(A, 3)
    with pytest.raises(ValueError, match="strictly increase"):
        tracker.track(A, second)


def test_offsets_must_increase_even_after_everything_finished() -> None:
    tracker = OffsetTracker()
    tracker.done(tracker.track(A, 3))
    with pytest.raises(ValueError):
        tracker.track(A, 3)


def test_negative_offsets_are_rejected() -> None:
    with pytest.raises(ValueError):
        OffsetTracker().track(A, -1)


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    a = tracker.track(A, 10)
    tracker.track(B, 0)
    tracker.done(a)
    assert points(tracker) == {A: 11, B: 0}
    assert tracker.in_flight(A) == 0
    assert tracker.in_flight(B) == 1
    assert tracker.in_flight() == 1


def test_forget_returns_final_positions_and_drops_the_partition() -> None:
    tracker = OffsetTracker()
    refs = [tracker.track(A, offset) for offset in range(3)]
    tracker.track(B, 0)
    tracker.done(refs[0])
    assert tracker.forget([A]) == {A: Position(1)}
    assert tracker.in_flight(A) == 0
    assert points(tracker) == {B: 0}
    tracker.done(refs[1])
    assert A not in tracker.positions()


def test_forget_omits_partitions_whose_commit_point_did_not_move() -> None:
    tracker = OffsetTracker()
    tracker.track(A, 0)
    tracker.mark_committed({A: Position(0)})
    assert tracker.forget([A, B]) == {}


def test_a_forgotten_partition_can_be_tracked_afresh_from_any_offset() -> None:
    tracker = OffsetTracker()
    tracker.track(A, 50)
    tracker.forget([A])
    tracker.track(A, 10)
    assert points(tracker) == {A: 10}


def test_an_event_with_held_parts_is_done_only_when_every_part_is():
    tracker = OffsetTracker()
    ref = tracker.track(A, 0)
    assert tracker.hold(ref, parts=2)
    tracker.done(ref)
    tracker.done(ref)
    assert points(tracker) == {A: 0}
    tracker.done(ref)
    assert points(tracker) == {A: 1}
    assert not tracker.hold(ref)


def test_an_answer_of_an_earlier_assignment_finishes_nothing_of_the_replay():
    """Review finding 7: the partition is lost and assigned back; the replay tracks offset 10 again with
    an answer part and a window part; the old incarnation's answer to offset 10 arrives late. Before
    refs carried the epoch, it released a part of the new event, and the commit point passed it while
    its rebuilt window was still open."""
    tracker = OffsetTracker()
    old = tracker.track(A, 10)
    tracker.forget([A])
    new = tracker.track(A, 10)
    assert tracker.hold(new)  # the window it joined
    assert not tracker.hold(old)
    tracker.done(old)  # the old answer, written late
    tracker.done(new)  # the new answer
    assert points(tracker) == {A: 10}, "the window still holds it"
    assert not tracker.current(old) and tracker.current(new)


def test_positions_are_held_at_their_limits_and_never_go_back():
    tracker = OffsetTracker()
    refs = [tracker.track(A, offset) for offset in range(6)]
    for ref in refs:
        tracker.done(ref)
    assert points(tracker) == {A: 6}
    assert tracker.positions({A: 4}) == {A: Position(4)}
    tracker.mark_committed(tracker.positions({A: 4}))
    assert tracker.positions({A: 2}) == {}, "a lower limit never moves a commit back"
    assert tracker.positions({A: 4}) == {}, "nor repeats it"
    assert tracker.positions() == {A: Position(6)}


def test_a_commit_carries_the_watermark_its_next_event_was_placed_under():
    tracker = OffsetTracker()
    refs = [tracker.track(A, offset) for offset in range(4)]
    for ref, (before, after) in zip(refs, [(None, 100), (100, 250), (400, 400), (400, 900)], strict=True):
        tracker.note(ref, before, after)  # between offsets 1 and 2 the partition went idle: 250 -> 400
    tracker.done(refs[0])
    tracker.done(refs[1])
    assert tracker.positions() == {A: Position(2, 400)}, "a replay from 2 must place it under 400"
    tracker.mark_committed(tracker.positions())
    tracker.done(refs[3])
    assert tracker.positions() == {}, "offset 2 still holds it"
    tracker.done(refs[2])
    assert tracker.positions() == {A: Position(4, 900)}
    tracker.mark_committed(tracker.positions())
    tracker.advance(A, 1_500)  # idle since: the next event will be placed under 1500
    tracker.done(tracker.track(A, 4))  # not noted (a bad message)
    assert tracker.positions() == {A: Position(5, 1_500)}


def test_a_partition_restored_with_a_mark_commits_it_before_noting_any_event():
    tracker = OffsetTracker()
    tracker.begin(A, 700)
    tracker.done(tracker.track(A, 3))  # a bad message: nothing to note
    assert tracker.positions() == {A: Position(4, 700)}


def test_a_failed_commit_reports_the_position_again():
    tracker = OffsetTracker()
    tracker.done(tracker.track(A, 0))
    tracker.mark_committed(tracker.positions())
    assert tracker.positions() == {}
    tracker.commit_failed([A])
    assert tracker.positions() == {A: Position(1)}


def test_a_watermark_moved_by_idleness_is_committed_again_at_the_same_offset():
    """So a replay places the next event under it: committed only with the offset, a quiet partition's
    watermark would be the one of its last event, and an event judged late after the quiet spell could
    be counted in a window on replay."""
    tracker = OffsetTracker()
    ref = tracker.track(A, 0)
    tracker.note(ref, None, 100)
    tracker.done(ref)
    tracker.mark_committed(tracker.positions())
    assert tracker.positions() == {}
    tracker.advance(A, 5_000)
    assert tracker.positions() == {A: Position(1, 5_000)}
