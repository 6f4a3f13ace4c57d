"""Which read of a partition's committed watermark its replay starts from: the one of its current
assignment (adversarial review, suspicion 9: a partition lost and assigned again while the first read
was under way took that read's answer, which may predate the other owner's commits)."""

from __future__ import annotations

from streamer.kafka.positions import Restores

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
