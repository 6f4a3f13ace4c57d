"""SmoothQuant-style smoothing before int8 activation quantization (exact in float).

Small Llamas carry a few huge activation channels into their Linear layers; one int8 scale per
input tensor (what torch's dynamic Linear uses) then crushes every other channel (SmolLM2-135M:
perplexity 3x with plain int8 dynamic). Dividing those channels by s in the op that produces them
(an RMSNorm weight; up_proj's rows for down_proj; the final norm for the LM head, once untied) and
multiplying the consuming Linear's columns by s leaves the float model unchanged (SmolLM2's logits
move by < 1e-4) but moves the outliers into weights, which are quantized per channel. Linears that keep
float activations (int8 weight-only) are left out: there the move only widens the weight's range.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch
from torch import nn

ALPHA = 0.8  # share of the outlier moved into the weights
CALIBRATION_TOKENS = 1024
EPS = 1e-5


def default_calibration_texts() -> list[str]:
    """Python's documentation topics (shipped with CPython): generic English prose, not the eval set."""
    from pydoc_data.topics import topics

    return list(topics.values())[:20]


def untie_lm_head(model: nn.Module) -> None:
    """Give the LM head its own weight, so quantizing it (or smoothing the final norm into it) leaves
    the embedding alone. Costs nothing once quantized: int8 embedding rows and an int8 head are stored
    separately anyway.
    """
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embedding.weight:
        head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False


def _groups(model: nn.Module) -> Iterator[tuple[nn.Module, list[nn.Linear]]]:
    """(producer, consumers sharing its output) in each Llama-style block, and the final norm with an
    untied LM head; factorized layers are skipped."""
    head = model.get_output_embeddings()
    if head.weight is not model.get_input_embeddings().weight:
        yield model.model.norm, [head]
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for producer, consumers in (
            (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
            (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
            (mlp.up_proj, [mlp.down_proj]),
        ):
            if all(type(m) is nn.Linear for m in consumers) and isinstance(
                getattr(producer, "weight", None), torch.Tensor
            ):
                yield producer, consumers


def calibration_ids(model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """The first CALIBRATION_TOKENS tokens of `texts`, as one row on the model's device."""
    ids = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"][:CALIBRATION_TOKENS]
    return torch.tensor([ids], device=next(model.parameters()).device)


@torch.no_grad()
def smooth(model: nn.Module, ids: torch.Tensor, alpha: float = ALPHA, skip: Collection[str] = ()) -> None:
    """Rescale in place from per-channel input maxima seen on the calibration `ids`, except where a
    consumer is named in `skip`."""
    skipped = {id(model.get_submodule(name)) for name in skip}
    groups = [(p, consumers) for p, consumers in _groups(model) if not any(id(c) in skipped for c in consumers)]
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
    for i, (producer, consumers) in enumerate(groups):
        weight_max = torch.stack([m.weight.abs().amax(0) for m in consumers]).amax(0).float()
        scale = (maxima[i].clamp(min=EPS) ** alpha / weight_max.clamp(min=EPS) ** (1 - alpha)).clamp(min=EPS)
        if isinstance(producer, nn.Linear):
            producer.weight.div_(scale[:, None].to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.div_(scale.to(producer.bias.dtype))
        else:
            producer.weight.div_(scale.to(producer.weight.dtype))
        for consumer in consumers:
            consumer.weight.mul_(scale[None, :].to(consumer.weight.dtype))
