"""Low-rank factorization: each Linear W (out x in) becomes up @ down from a truncated SVD.

Ranks are chosen per layer from one energy threshold (the share of squared singular values kept);
for a target size the threshold is found by bisection. A layer whose factors would not be smaller
than the dense weight stays dense.
"""

from __future__ import annotations

import torch
from torch import nn

from streamer.compress.errors import CompressError
from streamer.compress.prune import decoder_linears

BISECTION_ROUNDS = 30


class LowRankLinear(nn.Module):
    """`up(down(x))`: in -> rank -> out, with the original bias on `up`."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, svd: tuple[torch.Tensor, ...]) -> LowRankLinear:
        u, s, vh = svd
        module = cls(linear.in_features, linear.out_features, rank, linear.bias is not None)
        root = s[:rank].sqrt()
        with torch.no_grad():
            module.down.weight.copy_(root[:, None] * vh[:rank])
            module.up.weight.copy_(u[:, :rank] * root)
            if linear.bias is not None:
                module.up.bias.copy_(linear.bias)
        return module.to(linear.weight.dtype)


def thin_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    u, singular, vh = (u, singular, v.T) if tall else (v, singular, u.T)
    return u.float(), singular.float(), vh.float()


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


def energy_for_target(
    spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], total: int, target_params: int
) -> float:
    """The largest energy threshold whose ranks bring the model to at most `target_params` parameters."""
    low, high = 0.0, 1.0
    for _ in range(BISECTION_ROUNDS):
        mid = (low + high) / 2
        if params_after(choose_ranks(spectra, shapes, mid), shapes, total) <= target_params:
            low = mid
        else:
            high = mid
    if params_after(choose_ranks(spectra, shapes, low), shapes, total) > target_params:
        raise CompressError(f"cannot reach {target_params} parameters by factoring the decoder's Linear layers")
    return low


def factorize(model: nn.Module, *, energy: float | None = None, target_fraction: float | None = None) -> dict:
    """Replace decoder Linear layers in place; returns the structure a loader needs (ranks per module)."""
    if (energy is None) == (target_fraction is None):
        raise CompressError("low-rank needs exactly one of an energy threshold or a target parameter fraction")
    linears = decoder_linears(model)
    svds = {name: thin_svd(m.weight) for name, m in linears.items()}
    spectra = {name: svd[1] for name, svd in svds.items()}
    shapes = {name: tuple(m.weight.shape) for name, m in linears.items()}
    total = sum(p.numel() for p in model.parameters())
    if energy is None:
        energy = energy_for_target(spectra, shapes, total, int(total * target_fraction))
    ranks = choose_ranks(spectra, shapes, energy)
    for name, rank in ranks.items():
        _replace(model, name, LowRankLinear.from_linear(linears[name], rank, svds[name]))
    return {"ranks": ranks, "energy": energy}


def rebuild(model: nn.Module, ranks: dict[str, int]) -> None:
    """Put empty factor modules where the manifest says, so a saved state dict loads into them."""
    linears = decoder_linears(model)
    for name, rank in ranks.items():
        linear = linears[name]
        shell = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None)
        _replace(model, name, shell.to(linear.weight.dtype))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
