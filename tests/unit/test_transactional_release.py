"""Exactly once: an outcome goes into a transaction only once the commit points pass all its events,
so the offsets committed with a record always cover every event it stands for."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streamer.contracts import DeadLetter, ErrorCode, Source
from streamer.kafka.offsets import OffsetTracker
from streamer.writer import Outcome, covered

TP_A = ("in", 0)
TP_B = ("in", 1)


def outcome(*refs: tuple[tuple[str, int], int]) -> Outcome:
    letter = DeadLetter(error=ErrorCode.INVALID_JSON, detail="x", payload="x", payload_encoding="utf-8",
                        source=Source(topic="in", partition=0, offset=0), ts=0)
    return Outcome("dlq", None, letter, tuple(refs), "r")


def test_an_outcome_waits_until_every_event_it_finishes_is_below_the_commit_point():
    first, spanning, later = outcome((TP_A, 3)), outcome((TP_A, 4), (TP_B, 9)), outcome((TP_A, 7))
    ready, held = covered([first, spanning, later], {TP_A: 5, TP_B: 9})
    assert ready == [first]
    assert held == [spanning, later]


def test_outcomes_of_untracked_partitions_are_held_and_ones_without_events_go_at_once():
    provisional, revoked = outcome(), outcome((TP_B, 0))
    assert covered([provisional, revoked], {TP_A: 10}) == ([provisional], [revoked])


@given(st.lists(st.booleans(), min_size=1, max_size=60), st.randoms(use_true_random=False))
def test_committed_offsets_cover_exactly_the_released_outcomes(finished_flags, rng):
    """Events finish in any order; after each step, released outcomes are exactly the finished events
    below the partition's commit point, and the commit point never passes an unreleased one."""
    tracker = OffsetTracker()
    for offset in range(len(finished_flags)):
        tracker.track(TP_A, offset)
    order = [o for o, finished in enumerate(finished_flags) if finished]
    rng.shuffle(order)
    pending: list[Outcome] = []
    released: list[int] = []
    for offset in order:
        tracker.done(TP_A, offset)
        pending.append(outcome((TP_A, offset)))
        ready, pending = covered(pending, tracker.commit_points())
        released += [o.releases[0][1] for o in ready]
        point = tracker.commit_points()[TP_A]
        assert sorted(released) == [o for o in sorted(order) if o < point]
        assert all(o.releases[0][1] >= point for o in pending)
