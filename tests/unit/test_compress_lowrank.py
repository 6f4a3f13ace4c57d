"""Low-rank factorization: rank selection for energy thresholds and target sizes, and whitening by
the inputs (lower output error than plain SVD at the same rank; factored models reload as saved)."""

import copy

import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from streamer.compress.lowrank import (
    CALIBRATION_SEQ,
    LowRankLinear,
    calibration_ids,
    choose_ranks,
    factorize,
    params_after,
    rank_for_energy,
    ranks_for_target,
    rebuild,
    thin_svd,
    whitened_svd,
    worthwhile,
)
from streamer.compress.prune import decoder_linears
from tests.tiny import tiny_tokenizer

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


@given(st.lists(spectrum, min_size=1, max_size=5), st.floats(min_value=0.0, max_value=1.0))
def test_an_energy_threshold_factors_each_layer_at_its_rank_where_that_saves(spectra, energy):
    shapes = {f"l{i}": (len(s) * 3, len(s) * 2) for i, s in enumerate(spectra)}
    ranks = choose_ranks({f"l{i}": s for i, s in enumerate(spectra)}, shapes, energy)
    for i, singular in enumerate(spectra):
        rank = rank_for_energy(singular, energy)
        assert ranks.get(f"l{i}") == (rank if worthwhile(rank, *shapes[f"l{i}"]) else None)


@given(st.lists(spectrum, min_size=1, max_size=5), st.floats(min_value=0.3, max_value=1.0))
def test_a_target_size_is_met_and_factors_never_grow_a_layer(spectra, fraction):
    names = [f"l{i}" for i in range(len(spectra))]
    shapes = {n: (len(s) * 3, len(s) * 2) for n, s in zip(names, spectra, strict=True)}
    by_name = dict(zip(names, spectra, strict=True))
    total = sum(o * i for o, i in shapes.values()) + 1000
    target = int(total * fraction)
    smallest = params_after({n: 1 for n, shape in shapes.items() if worthwhile(1, *shape)}, shapes, total)
    assume(smallest <= target)  # an unreachable target is an error of its own
    ranks = ranks_for_target(by_name, shapes, total, target)
    assert params_after(ranks, shapes, total) <= target
    assert all(worthwhile(r, *shapes[n]) for n, r in ranks.items())


@given(st.integers(min_value=1, max_value=24), st.integers(min_value=1, max_value=24))
def test_the_gram_svd_matches_lapack(rows, columns):
    weight = torch.randn(rows, columns)
    u, s, vh = thin_svd(weight)
    expected = torch.linalg.svd(weight.double(), full_matrices=False)
    assert u.dtype == s.dtype == vh.dtype == torch.float64
    assert torch.allclose(s, expected.S, atol=1e-4)
    assert torch.allclose((u * s) @ vh, weight.double(), atol=1e-4)


def skewed_inputs(rows: int, features: int) -> torch.Tensor:
    """Inputs whose channel scales span e^-3..e^3, as Llama's outlier channels do."""
    return torch.randn(rows, features) * torch.linspace(-3, 3, features).exp()


def test_whitening_by_the_inputs_lowers_the_output_error_at_every_rank():
    torch.manual_seed(0)
    weight, x = torch.randn(24, 16), skewed_inputs(200, 16)
    plain, whitened = thin_svd(weight), whitened_svd(weight, x.T @ x)
    for rank in range(1, 16):
        errors = [
            torch.linalg.norm((weight.double() - (u[:, :rank] * s[:rank]) @ vh[:rank]) @ x.double().T)
            for u, s, vh in (plain, whitened)
        ]
        assert errors[1] < errors[0]


def tiny_llama() -> LlamaForCausalLM:
    """Two random Llama blocks whose norms give the Linear layers skewed inputs."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.linspace(-3, 3, 32).exp()[torch.randperm(32)])
    return model


def test_a_calibrated_factorization_beats_plain_svd_at_the_same_ranks_and_reloads():
    source = tiny_llama()
    ids = calibration_ids(tiny_tokenizer(), ["the quick brown fox jumps over the lazy dog."] * 12)
    assert ids.shape == (1, len(ids[0])) and len(ids[0]) <= CALIBRATION_SEQ
    whitened, plain = copy.deepcopy(source), copy.deepcopy(source)
    total = sum(p.numel() for p in source.parameters())
    ranks = factorize(whitened, target_fraction=0.8, calibration=ids)["ranks"]
    assert ranks and sum(p.numel() for p in whitened.parameters()) <= 0.8 * total
    for name, linear in decoder_linears(plain).items():
        if name in ranks:
            parent, _, child = name.rpartition(".")
            factors = LowRankLinear.from_linear(linear, ranks[name], thin_svd(linear.weight))
            setattr(plain.get_submodule(parent), child, factors)
    for name, rank in ranks.items():
        module, dense = whitened.get_submodule(name), source.get_submodule(name)
        assert isinstance(module, LowRankLinear)
        assert module.down.weight.shape == (rank, dense.in_features)
        assert module.up.weight.shape == (dense.out_features, rank)

    with torch.inference_mode():
        expected = source(input_ids=ids).logits
        errors = [torch.linalg.norm(m(input_ids=ids).logits - expected) for m in (plain, whitened)]
    assert errors[1] < errors[0]

    reloaded = tiny_llama()
    rebuild(reloaded, ranks)
    reloaded.load_state_dict(whitened.state_dict())
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, whitened(input_ids=ids).logits)
