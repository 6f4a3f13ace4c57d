"""Decode rows are cut into length groups so short sequences are not padded to the longest one."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from streamer.engine.paged import group_lengths

BLOCK = 16


def cost(lengths: list[int], ends: list[int], per_group: int) -> int:
    total, start = 0, 0
    for end in ends:
        total += (end - start) * -(-lengths[end - 1] // BLOCK) * BLOCK + per_group
        start = end
    return total


@given(st.lists(st.integers(1, 2048), min_size=1, max_size=12), st.integers(0, 1024))
def test_groups_cover_every_row_once_at_the_least_cost(raw: list[int], per_group: int) -> None:
    lengths = sorted(raw)
    ends = group_lengths(lengths, BLOCK, per_group)
    assert ends == sorted(set(ends)) and ends[-1] == len(lengths) and ends[0] > 0
    every_cut = ([*c, len(lengths)] for r in range(len(lengths))
                 for c in itertools.combinations(range(1, len(lengths)), r))
    assert cost(lengths, ends, per_group) == min(cost(lengths, c, per_group) for c in every_cut)


def test_similar_lengths_share_one_group_and_far_apart_ones_do_not() -> None:
    assert group_lengths([100, 110, 120, 128], BLOCK) == [4]
    assert group_lengths([20, 30, 40, 900, 1000], BLOCK) == [3, 5]
