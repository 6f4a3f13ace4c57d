"""Pruning recipes: unstructured magnitude pruning (size on disk) and 2:4 semi-structured sparsity.

2:4 keeps the two largest of every four consecutive input weights, the pattern PyTorch's
semi-structured sparse kernels (`to_sparse_semi_structured`) accelerate on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

from streamer.compress.errors import CompressError


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers inside the transformer blocks; the (often tied) LM head is left alone."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{name}"}


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per layer, keep the largest `1 - sparsity` of weights by magnitude."""
    if not 0.0 < sparsity < 1.0:
        raise CompressError(f"sparsity must be between 0 and 1, got {sparsity}")
    masks = {}
    for name, linear in decoder_linears(model).items():
        w = linear.weight.detach().abs().flatten()
        k = int(w.numel() * sparsity)
        threshold = w.kthvalue(k).values if k else w.min() - 1
        masks[name] = (linear.weight.detach().abs() > threshold).reshape(linear.weight.shape)
    return masks


def two_four_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per group of four consecutive input weights, keep the two largest magnitudes."""
    masks = {}
    for name, linear in decoder_linears(model).items():
        out_features, in_features = linear.weight.shape
        if in_features % 4:
            raise CompressError(f"{name}: 2:4 sparsity needs in_features divisible by 4, got {in_features}")
        groups = linear.weight.detach().abs().reshape(out_features, in_features // 4, 4)
        keep = groups.topk(2, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
        masks[name] = mask.reshape(out_features, in_features)
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights (also after every recovery step, so training cannot regrow them)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.mul_(mask.to(modules[name].weight.device))


def is_two_four(weight: torch.Tensor) -> bool:
    groups = weight.detach().reshape(weight.shape[0], -1, 4)
    return bool(((groups != 0).sum(-1) <= 2).all())


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Serve 2:4-pruned Linear weights with PyTorch's semi-structured sparse kernels (CUDA, fp16/bf16)."""
    if not torch.cuda.is_available():
        raise CompressError("2:4 sparse kernels need a CUDA GPU; on CPU the pruned weights are served dense")
    from torch.sparse import to_sparse_semi_structured

    for linear in decoder_linears(model).values():
        if is_two_four(linear.weight):
            linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
    return model
