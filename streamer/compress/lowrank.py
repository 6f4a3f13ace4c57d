"""Low-rank factorization: each decoder Linear W (out x in) becomes up @ down, in -> rank -> out.

With calibration text (what `streamer compress` passes: the corpus, else Python's doc topics) the
factors come from the SVD of W S, S S^T = X^T X the Gram matrix of the layer's inputs on that text
(SVD-LLM's whitening): ||(W - W') S|| is the layer's output error there, and truncating W S is
optimal for it. Plain SVD of W keeps the directions where W is large, not those the inputs use, and
Llama inputs are dominated by a few outlier channels (and the first token's massive activations,
which must be kept: leaving position 0 out of X made it 990x). Without calibration (unit tests) W's
own SVD is used.

For a target size, ranks follow one price bisected over all layers: a layer keeps the components
whose share of its squared singular values, per parameter they cost (out + in), is above the price,
which minimizes the summed relative output error for the size. One energy share for every layer
(what `--energy` still means) ignores that a rank of a 576x1536 layer costs 2.75x one of k_proj,
and left some layers at rank 1.

SmolLM2-135M at 0.70x parameters, perplexity on the eval texts (source 30.5), 0 recovery steps:
plain SVD 9.3e7 (3e6x); whitened with one energy share 3508 (115x); whitened and priced 1966 (64x);
a ridge of 1e-2 instead of 1e-3, or X^T X of per-token normalised inputs, did worse. 40 recovery
steps (4 x 64 tokens): plain 6954 (228x, agreement 0.2%), whitened and priced 1250 (41x, 23.7%).
1.15x needs a real fine-tune: a 135M model has little redundancy, and the embedding (28M) is not
factored, so the decoder's Linears must shrink to 62%.

A layer whose factors would not be smaller than the dense weight stays dense.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from streamer.compress import corpus
from streamer.compress.errors import CompressError
from streamer.compress.prune import decoder_linears

BISECTION_ROUNDS = 60  # prices per parameter are ~1e-6: 30 halvings of [0, 1] would be too coarse
CALIBRATION_TOKENS = 4096
CALIBRATION_SEQ = 512
RIDGE = 1e-3  # added to X^T X, relative to its mean diagonal: directions the text never uses stay bounded

Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class LowRankLinear(nn.Module):
    """`up(down(x))`: in -> rank -> out, with the original bias on `up`."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, svd: Svd) -> LowRankLinear:
        u, s, vh = svd
        module = cls(linear.in_features, linear.out_features, rank, linear.bias is not None)
        root = s[:rank].sqrt()
        with torch.no_grad():
            module.down.weight.copy_(root[:, None] * vh[:rank])
            module.up.weight.copy_(u[:, :rank] * root)
            if linear.bias is not None:
                module.up.bias.copy_(linear.bias)
        return module.to(linear.weight.device, linear.weight.dtype)


def thin_svd(weight: torch.Tensor) -> Svd:
    """(u, s, vh) of `weight` from the eigendecomposition of its smaller Gram matrix, in float64.

    LAPACK's `gesdd` (what `torch.linalg.svd` calls on CPU) takes 0.7-2.5 s for one 576x1536 matrix
    on a 2-core machine, which made SmolLM2's 210 layers take over 15 minutes; `eigh` of the
    576x576 Gram matrix takes ~0.1 s. Squaring the singular values costs precision only for the
    smallest ones, which truncation drops anyway (float64 keeps even those to ~1e-13 here).
    """
    w = weight.detach().double()
    tall = w.shape[0] >= w.shape[1]
    a = w if tall else w.T
    squares, v = torch.linalg.eigh(a.T @ a)  # ascending
    singular, v = squares.flip(0).clamp(min=0).sqrt(), v.flip(1)
    u = (a @ v) / singular.clamp(min=torch.finfo(w.dtype).tiny)
    return (u, singular, v.T) if tall else (v, singular, u.T)


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor) -> Svd:
    """(u, s, vh S^-1) from the SVD of W S, S the Cholesky factor of `gram` (X^T X) plus a ridge:
    `u[:, :r] * s[:r] @ vh[:r]` is the rank-r W' with the least output error on those inputs."""
    gram = gram.double()
    ridge = RIDGE * gram.diagonal().mean()
    root = torch.linalg.cholesky(gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device))
    u, singular, vh = thin_svd(weight.detach().double() @ root)
    return u, singular, torch.linalg.solve_triangular(root, vh, upper=False, left=False)


def calibration_ids(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Up to CALIBRATION_TOKENS tokens of `texts` in rows of CALIBRATION_SEQ (one shorter row if fewer)."""
    ids = corpus.token_ids(texts, tokenizer, CALIBRATION_TOKENS)
    return corpus.rows(ids, min(CALIBRATION_SEQ, len(ids)))


@torch.no_grad()
def input_grams(model: nn.Module, linears: dict[str, nn.Linear], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X of each Linear's inputs over the rows of `ids` (float64), collected with forward hooks."""
    grams: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram = (x.T @ x).double()
            grams[name] = grams[name] + gram if name in grams else gram

        return hook

    hooks = [m.register_forward_pre_hook(recorder(name)) for name, m in linears.items()]
    device = next(model.parameters()).device
    try:
        for row in ids:
            model(input_ids=row[None].to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return grams


def worthwhile(rank: int, out_features: int, in_features: int) -> bool:
    return rank * (in_features + out_features) < in_features * out_features


def rank_for_energy(singular: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least `energy` of the squared total."""
    share = (singular**2).cumsum(0) / (singular**2).sum()
    return min(int((share < energy).sum().item()) + 1, len(singular))  # rounding can leave share[-1] < 1


def choose_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], energy: float) -> dict[str, int]:
    """Ranks per layer for one energy threshold; layers where factoring would not save are omitted."""
    ranks = {}
    for name, singular in spectra.items():
        rank = rank_for_energy(singular, energy)
        if worthwhile(rank, *shapes[name]):
            ranks[name] = rank
    return ranks


def params_after(ranks: dict[str, int], shapes: dict[str, tuple[int, int]], total: int) -> int:
    saved = sum(out * inp - ranks[n] * (out + inp) for n, (out, inp) in shapes.items() if n in ranks)
    return total - saved


def ranks_at_price(
    spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], price: float
) -> dict[str, int]:
    """Per layer, the components whose share of its squared singular values per parameter they cost
    (out + in) is at least `price` (at least one); layers where factoring would not save are omitted."""
    ranks = {}
    for name, singular in spectra.items():
        value = singular**2 / (singular**2).sum() / sum(shapes[name])
        rank = max(1, int((value >= price).sum().item()))
        if worthwhile(rank, *shapes[name]):
            ranks[name] = rank
    return ranks


def ranks_for_target(
    spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], total: int, target_params: int
) -> dict[str, int]:
    """The largest ranks, by one price per parameter (bisected), that bring the model to at most
    `target_params` parameters: the least summed relative error for the size."""
    low, high = 0.0, 1.0
    for _ in range(BISECTION_ROUNDS):
        mid = (low + high) / 2
        if params_after(ranks_at_price(spectra, shapes, mid), shapes, total) <= target_params:
            high = mid
        else:
            low = mid
    ranks = ranks_at_price(spectra, shapes, high)
    if params_after(ranks, shapes, total) > target_params:
        raise CompressError(f"cannot reach {target_params} parameters by factoring the decoder's Linear layers")
    return ranks


def factorize(
    model: nn.Module,
    *,
    energy: float | None = None,
    target_fraction: float | None = None,
    calibration: torch.Tensor | None = None,
) -> dict:
    """Replace decoder Linear layers in place, whitened by their inputs on the `calibration` token ids
    (rows) when given; returns the structure a loader needs (ranks per module)."""
    if (energy is None) == (target_fraction is None):
        raise CompressError("low-rank needs exactly one of an energy threshold or a target parameter fraction")
    linears = decoder_linears(model)
    if calibration is None:
        svds = {name: thin_svd(m.weight) for name, m in linears.items()}
    else:
        grams = input_grams(model, linears, calibration)
        svds = {name: whitened_svd(m.weight, grams.pop(name)) for name, m in linears.items()}
    spectra = {name: svd[1] for name, svd in svds.items()}
    shapes = {name: tuple(m.weight.shape) for name, m in linears.items()}
    if energy is None:
        total = sum(p.numel() for p in model.parameters())
        ranks = ranks_for_target(spectra, shapes, total, int(total * target_fraction))
    else:
        ranks = choose_ranks(spectra, shapes, energy)
    for name, rank in ranks.items():
        model.set_submodule(name, LowRankLinear.from_linear(linears[name], rank, svds[name]))
    return {"ranks": ranks}


def rebuild(model: nn.Module, ranks: dict[str, int]) -> None:
    """Put empty factor modules where the manifest says, so a saved state dict loads into them."""
    linears = decoder_linears(model)
    for name, rank in ranks.items():
        linear = linears[name]
        shell = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None)
        model.set_submodule(name, shell.to(linear.weight.dtype))
