"""Rank selection for low-rank factorization: energy thresholds and target sizes."""

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from streamer.compress.lowrank import (
    choose_ranks,
    energy_for_target,
    params_after,
    rank_for_energy,
    thin_svd,
    worthwhile,
)

spectrum = st.lists(st.floats(min_value=0.01, max_value=100.0), min_size=2, max_size=40).map(
    lambda xs: torch.tensor(sorted(xs, reverse=True))
)


@given(spectrum, st.floats(min_value=0.0, max_value=1.0))
def test_the_chosen_rank_is_the_smallest_that_keeps_the_energy(singular, energy):
    rank = rank_for_energy(singular, energy)
    kept = (singular[:rank] ** 2).sum() / (singular**2).sum()
    assert 1 <= rank <= len(singular)
    assert kept >= energy - 1e-6 or rank == len(singular)
    if rank > 1:
        assert (singular[: rank - 1] ** 2).sum() / (singular**2).sum() < energy + 1e-6


@given(st.lists(spectrum, min_size=1, max_size=5), st.floats(min_value=0.3, max_value=1.0))
def test_a_target_size_is_met_and_factors_never_grow_a_layer(spectra, fraction):
    names = [f"l{i}" for i in range(len(spectra))]
    shapes = {n: (len(s) * 3, len(s) * 2) for n, s in zip(names, spectra, strict=True)}
    by_name = dict(zip(names, spectra, strict=True))
    total = sum(o * i for o, i in shapes.values()) + 1000
    target = int(total * fraction)
    smallest = params_after(choose_ranks(by_name, shapes, 0.0), shapes, total)
    assume(smallest <= target)  # an unreachable target is an error of its own
    ranks = choose_ranks(by_name, shapes, energy_for_target(by_name, shapes, total, target))
    assert params_after(ranks, shapes, total) <= target
    assert all(worthwhile(r, *shapes[n]) for n, r in ranks.items())


@given(st.integers(min_value=1, max_value=24), st.integers(min_value=1, max_value=24))
def test_the_gram_svd_matches_lapack(rows, columns):
    weight = torch.randn(rows, columns)
    u, s, vh = thin_svd(weight)
    expected = torch.linalg.svd(weight.double(), full_matrices=False)
    assert torch.allclose(s.double(), expected.S, atol=1e-4)
    assert torch.allclose((u * s) @ vh, weight, atol=1e-4)
