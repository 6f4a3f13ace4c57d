"""What the source knows of a partition's position: which read of its committed watermark its replay
starts from (the one of its current assignment: a partition lost and assigned again while the first
read was under way took that read's answer, which may predate the other owner's commits), and how many
of its records wait (from its committed offset while librdkafka reports no position yet)."""

from __future__ import annotations

from streamer.kafka.positions import UNKNOWN, Restores, lag_of

P0, P1 = ("in", 0), ("in", 1)


def test_the_read_of_an_earlier_assignment_does_not_finish_a_partition_assigned_again() -> None:
    restores = Restores()
    first = restores.begin([P0, P1])
    restores.cancel([P0])  # lost
    second = restores.begin([P0])  # and assigned back, a new read under way
    assert not restores.finish(P0, first), "the first read may predate the other owner's commits"
    assert restores.pending() == {P0, P1}
    assert restores.finish(P1, first)
    assert restores.finish(P0, second)
    assert restores.pending() == frozenset()


def test_a_revoked_partitions_answer_finishes_nothing() -> None:
    restores = Restores()
    ticket = restores.begin([P0])
    restores.cancel([P0])
    assert not restores.finish(P0, ticket) and not restores.pending()


def test_a_quiet_partition_just_assigned_has_nothing_waiting_though_its_log_holds_records() -> None:
    """Second adversarial review, finding 1: counted from the log start, the 5 records consumed before a
    restart were 'waiting' for ever: the partition never went idle and an idle instance looked stalled."""
    assert lag_of(UNKNOWN, committed=5, low=0, high=5) == 0
    assert lag_of(UNKNOWN, committed=3, low=0, high=5) == 2
    assert lag_of(UNKNOWN, committed=UNKNOWN, low=2, high=5) == 3  # never committed: from the log start
    assert lag_of(4, committed=1, low=0, high=5) == 1  # handed out up to 3: the position counts
    assert lag_of(UNKNOWN, committed=None, low=0, high=-1) == 0  # no fetch answered yet
