"""One model step over a ragged batch, with keys and values in a paged (block) cache.

Every token of the step — a decode token of each running sequence and the prompt chunks being
prefilled — goes through the projections, MLPs and norms as one flat [tokens, hidden] matrix: no
padding, so a 16-token prompt next to a 512-token one costs 16 tokens, not 512. Only attention is
per sequence: all decode tokens together in one call over their gathered blocks (masked to each
length), each prefill chunk in a call of its own (causal, offset by what is already cached).
The language-model head runs only on the positions whose logits are wanted.

It drives the layers of a Hugging Face Llama-family model (Llama, SmolLM2, Mistral, Qwen2) directly,
so weights, RoPE variants and norms stay the library's; architectures it does not know fall back to
the static-batch worker (see `supports`).

A model split across devices (`model.device_map`) keeps each layer's keys and values on that layer's
device and moves the hidden state to each layer before running it, then to the norm's and head's.
Tested on CPU only (an explicit all-"cpu" map); two real GPUs were not available to test here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any  # Hugging Face attention modules are untyped: their projections are plain attributes

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

SUPPORTED = frozenset({"llama", "mistral", "qwen2"})


def supports(model: PreTrainedModel) -> bool:
    """Whether the paged runner can drive this model (a decoder of the Llama layout, no sliding window)."""
    config = model.config
    if config.model_type not in SUPPORTED:
        return False
    if config.model_type == "qwen2":
        return not getattr(config, "use_sliding_window", False)
    return not getattr(config, "sliding_window", None)


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head_dim: int
    devices: tuple[torch.device, ...] = ()  # per layer, where its weights (so its cache) live; (): all on one

    @classmethod
    def of(cls, model: PreTrainedModel) -> Shape:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        devices = tuple(next(layer.parameters()).device for layer in model.model.layers)
        return cls(c.num_hidden_layers, c.num_key_value_heads, head_dim, devices)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Keys plus values of one token across all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(dtype).bits // 8


class PagedKV:
    """Per-layer key and value tensors [num_blocks, block_size, kv_heads, head_dim], on the layer's device
    (`device` when the shape does not say). Reads gather whole blocks: contiguous copies, small indices."""

    def __init__(self, shape: Shape, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        devices = shape.devices or (device,) * shape.layers
        self.keys = [torch.zeros(num_blocks, block_size, shape.kv_heads, shape.head_dim, dtype=dtype,
                                 device=devices[i]) for i in range(shape.layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) * 2


@dataclass(frozen=True)
class Row:
    """One sequence's part of a step: tokens [start, end) of a sequence that owns `blocks`."""

    tokens: Sequence[int]  # the new tokens only, len == end - start
    start: int
    end: int
    blocks: Sequence[int]
    logits: int  # how many of the last positions need logits (0: none)


class StepInputs:
    """Flat tensors of one step, built once and shared by every layer.

    Decode tokens come first in the flat order, sorted by length and cut into groups (`DecodeGroup`),
    so each group's queries and outputs are plain slices and its keys are padded only to its own
    longest sequence; prefill chunks follow. Logits still come out in the caller's row order.
    """

    def __init__(self, rows: Sequence[Row], block_size: int, device: torch.device) -> None:
        decoding = sorted((i for i, row in enumerate(rows) if row.end - row.start == 1), key=lambda i: rows[i].end)
        order = decoding + [i for i, row in enumerate(rows) if row.end - row.start != 1]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        flat_of: dict[int, int] = {}
        self.prefills: list[tuple[int, int, int, torch.Tensor]] = []  # (flat start, cache start, end, blocks)
        for i in order:
            row = rows[i]
            flat_of[i] = len(ids)
            ids.extend(row.tokens)
            positions.extend(range(row.start, row.end))
            slots.extend(row.blocks[p // block_size] * block_size + p % block_size for p in range(row.start, row.end))
            if row.end - row.start != 1:
                self.prefills.append((flat_of[i], row.start, row.end, _longs(_used_blocks(row, block_size), device)))
        logit_index = [p for i, row in enumerate(rows)
                       for p in range(flat_of[i] + len(row.tokens) - row.logits, flat_of[i] + len(row.tokens))]
        self.ids = _longs(ids, device)
        self.positions = _longs(positions, device)
        self.slots = _longs(slots, device)
        self.logit_index = _longs(logit_index, device)  # may be empty: a step of prompt chunks only
        self.decode = _decode_groups([rows[i] for i in decoding], block_size, device)


def _device_of(module: torch.nn.Module, default: torch.device) -> torch.device:
    """Where a module's tensors live; `default` for one without any (a dynamically quantized Linear)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return default


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """`cache[blocks]` as whole-block row copies: index_select is 2-3x faster than advanced indexing on CPU."""
    rows = cache.flatten(1).index_select(0, blocks.flatten())
    return rows.view(*blocks.shape, *cache.shape[1:])


def _longs(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _used_blocks(row: Row, block_size: int) -> list[int]:
    """The blocks holding positions 0..end-1 of the row's sequence."""
    return list(row.blocks[: -(-row.end // block_size)])


GROUP_COST_SLOTS = 256  # one more decode group costs about as much as gathering this many cache slots


@dataclass(frozen=True)
class DecodeGroup:
    """Decode tokens at flat positions [start, stop), attending over their blocks padded to the group's longest."""

    start: int
    stop: int
    blocks: torch.Tensor  # [B, n] block ids, padded with block 0
    mask: torch.Tensor | None  # [B, 1, 1, n * block_size] True where a slot holds one of the sequence's positions


def group_lengths(lengths: Sequence[int], block_size: int, cost: int = GROUP_COST_SLOTS) -> list[int]:
    """Where to cut sorted lengths into groups: the ends (exclusive) of the groups that minimise the slots
    gathered (each group padded to its longest, in whole blocks) plus `cost` per group."""
    n = len(lengths)
    width = [-(-length // block_size) * block_size for length in lengths]
    best = [0] + [0] * n  # best[j]: least cost of the first j lengths
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], cut[j] = min((best[i] + (j - i) * width[j - 1] + cost, i) for i in range(j))
    ends, j = [], n
    while j:
        ends.append(j)
        j = cut[j]
    return ends[::-1]


def _decode_groups(rows: list[Row], block_size: int, device: torch.device) -> list[DecodeGroup]:
    """Rows sorted by length, cut where padding them together would gather more than another group costs."""
    groups, start = [], 0
    for stop in group_lengths([row.end for row in rows], block_size):
        tables = [_used_blocks(row, block_size) for row in rows[start:stop]]
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        lengths = [row.end for row in rows[start:stop]]
        mask = None
        if min(lengths) < width * block_size:
            mask = (torch.arange(width * block_size, device=device)[None, :]
                    < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]
        groups.append(DecodeGroup(start, stop, torch.tensor(padded, dtype=torch.long, device=device), mask))
        start = stop
    return groups


class PagedRunner:
    """Runs steps of a Llama-family model against a PagedKV."""

    def __init__(self, model: PreTrainedModel, kv: PagedKV) -> None:
        if not supports(model):
            raise ValueError(f"the paged runner does not drive {model.config.model_type!r} models")
        self.model = model
        self.kv = kv
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def step(self, rows: Sequence[Row]) -> torch.Tensor:
        """Logits [sum(row.logits), vocab] in row order, after writing every row's keys and values."""
        inputs = StepInputs(rows, self.kv.block_size, self.device)
        body = self.model.model
        hidden = body.embed_tokens(inputs.ids)
        cos, sin = body.rotary_emb(hidden[None], inputs.positions[None])
        placed = {self.device: (inputs, cos[0], sin[0])}
        for i, layer in enumerate(body.layers):
            device = self.kv.keys[i].device
            if device not in placed:  # a model split across devices: this layer's inputs, built once per step
                placed[device] = (StepInputs(rows, self.kv.block_size, device), cos[0].to(device), sin[0].to(device))
            inputs, cos_i, sin_i = placed[device]
            hidden = hidden.to(device)
            residual = hidden
            x = layer.input_layernorm(hidden)
            hidden = residual + self._attention(layer.self_attn, x, cos_i, sin_i, inputs, i)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = body.norm(hidden[inputs.logit_index].to(_device_of(body.norm, hidden.device)))
        logits: torch.Tensor = self.model.lm_head(hidden.to(_device_of(self.model.lm_head, hidden.device)))
        return logits.float()

    def _attention(self, attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   inputs: StepInputs, layer: int) -> torch.Tensor:
        tokens = x.shape[0]
        head_dim = attn.head_dim
        q = attn.q_proj(x).view(tokens, -1, head_dim)
        k = attn.k_proj(x).view(tokens, -1, head_dim)
        v = attn.v_proj(x).view(tokens, -1, head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        keys, values = self.kv.keys[layer], self.kv.values[layer]
        keys.flatten(0, 1).index_copy_(0, inputs.slots, k)
        values.flatten(0, 1).index_copy_(0, inputs.slots, v)
        out = torch.empty_like(q)
        for group in inputs.decode:
            qd = q[group.start : group.stop, :, None, :]  # [B, H, 1, D]
            kd = _gather(keys, group.blocks).flatten(1, 2).transpose(1, 2)  # [B, Hkv, n * block_size, D]
            vd = _gather(values, group.blocks).flatten(1, 2).transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=group.mask, scale=attn.scaling, enable_gqa=True)
            out[group.start : group.stop] = o[:, :, 0, :]
        for flat, start, end, blocks in inputs.prefills:
            n = end - start
            qp = q[flat : flat + n].transpose(0, 1)[None]  # [1, H, n, D]
            if start == 0:  # a prompt's first chunk: its keys are the ones just computed, no gather
                kp = k[flat : flat + n].transpose(0, 1)[None]
                vp = v[flat : flat + n].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=attn.scaling, enable_gqa=True)
            else:
                kp = _gather(keys, blocks).flatten(0, 1)[:end].transpose(0, 1)[None]  # [1, Hkv, end, D]
                vp = _gather(values, blocks).flatten(0, 1)[:end].transpose(0, 1)[None]
                causal = torch.ones(n, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=causal, scale=attn.scaling, enable_gqa=True)
            out[flat : flat + n] = o[0].transpose(0, 1)
        projected: torch.Tensor = attn.o_proj(out.reshape(tokens, -1))
        return projected
