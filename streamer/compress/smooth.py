"""SmoothQuant-style smoothing before int8 activation quantization (exact in float).

Small Llamas carry a few huge activation channels into their Linear layers; one int8 scale per
token then crushes every other channel of that token. Dividing those channels by s in the RMSNorm
that produces them and multiplying the consuming Linears' columns by s leaves the float model
unchanged (SmolLM2's logits move by < 1e-4) but moves the outliers into weights, which are quantized
per channel. Only the Linears after a norm (q/k/v, gate/up) are smoothed: `down_proj` and the LM head
read per-token outliers, which per-token scales already take and which smoothing (per channel) only
spreads (SmolLM2-135M, 200 prompts: agreement 89.3% with `down_proj` smoothed, 91.5% without).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

ALPHA = 0.8  # share of the outlier moved into the weights
CALIBRATION_TOKENS = 1024
EPS = 1e-5


def _groups(model: nn.Module) -> Iterator[tuple[nn.Module, list[nn.Linear]]]:
    """(norm, Linears reading its output) in each Llama-style block; factorized layers are skipped."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, consumers in (
            (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
            (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
        ):
            if all(type(m) is nn.Linear for m in consumers) and isinstance(getattr(norm, "weight", None), torch.Tensor):
                yield norm, consumers


@torch.no_grad()
def smooth(model: nn.Module, ids: torch.Tensor, alpha: float = ALPHA) -> None:
    """Rescale in place from per-channel input maxima seen on the calibration `ids`."""
    groups = list(_groups(model))
    maxima: dict[int, torch.Tensor] = {}

    def recorder(index: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            maxima[index] = torch.maximum(maxima[index], seen) if index in maxima else seen

        return hook

    hooks = [consumers[0].register_forward_pre_hook(recorder(i)) for i, (_, consumers) in enumerate(groups)]
    try:
        model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    for i, (norm, consumers) in enumerate(groups):
        weight_max = torch.stack([m.weight.abs().amax(0) for m in consumers]).amax(0).float()
        scale = (maxima[i].clamp(min=EPS) ** alpha / weight_max.clamp(min=EPS) ** (1 - alpha)).clamp(min=EPS)
        norm.weight.div_(scale.to(norm.weight.dtype))
        for consumer in consumers:
            consumer.weight.mul_(scale[None, :].to(consumer.weight.dtype))
