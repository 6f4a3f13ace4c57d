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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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

    @classmethod
    def of(cls, model: PreTrainedModel) -> Shape:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.num_hidden_layers, c.num_key_value_heads, head_dim)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Keys plus values of one token across all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(dtype).bits // 8


class PagedKV:
    """Per-layer key and value tensors of `num_blocks * block_size` token slots."""

    def __init__(self, shape: Shape, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        slots = num_blocks * block_size
        self.block_size = block_size
        self.keys = [torch.zeros(slots, shape.kv_heads, shape.head_dim, dtype=dtype, device=device)
                     for _ in range(shape.layers)]
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
    """Flat tensors of one step, built once and shared by every layer."""

    def __init__(self, rows: Sequence[Row], block_size: int, device: torch.device) -> None:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_index: list[int] = []
        self.decode_index: list[int] = []
        decode_tables: list[list[int]] = []
        self.prefills: list[tuple[int, int, int, torch.Tensor]] = []  # (flat start, cache start, end, slots)
        for row in rows:
            flat = len(ids)
            ids.extend(row.tokens)
            positions.extend(range(row.start, row.end))
            table = _slot_table(row.blocks, row.end, block_size)
            slots.extend(table[row.start : row.end])
            logit_index.extend(range(flat + len(row.tokens) - row.logits, flat + len(row.tokens)))
            if row.end - row.start == 1:
                self.decode_index.append(flat)
                decode_tables.append(table)
            else:
                self.prefills.append((flat, row.start, row.end, _longs(table, device)))
        self.ids = _longs(ids, device)
        self.positions = _longs(positions, device)
        self.slots = _longs(slots, device)
        self.logit_index = _longs(logit_index, device)  # may be empty: a step of prompt chunks only
        self.decode = _decode_batch(decode_tables, self.decode_index, device)


def _longs(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _slot_table(blocks: Sequence[int], length: int, block_size: int) -> list[int]:
    """Cache slot of each position 0..length-1 of a sequence."""
    return [blocks[p // block_size] * block_size + p % block_size for p in range(length)]


@dataclass(frozen=True)
class _Decode:
    index: torch.Tensor  # flat positions of the decode tokens
    table: torch.Tensor  # [B, L] slots, padded with slot 0
    mask: torch.Tensor  # [B, 1, 1, L] True where a slot is part of the sequence


def _decode_batch(tables: list[list[int]], index: list[int], device: torch.device) -> _Decode | None:
    if not tables:
        return None
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    mask = [[True] * len(t) + [False] * (width - len(t)) for t in tables]
    return _Decode(
        _longs(index, device),
        torch.tensor(padded, dtype=torch.long, device=device),
        torch.tensor(mask, device=device)[:, None, None, :],
    )


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
        cos, sin = cos[0], sin[0]
        for i, layer in enumerate(body.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            hidden = residual + self._attention(layer.self_attn, x, cos, sin, inputs, i)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = body.norm(hidden[inputs.logit_index])
        return self.model.lm_head(hidden).float()

    def _attention(self, attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   inputs: StepInputs, layer: int) -> torch.Tensor:
        tokens = x.shape[0]
        head_dim = attn.head_dim
        q = attn.q_proj(x).view(tokens, -1, head_dim)
        k = attn.k_proj(x).view(tokens, -1, head_dim)
        v = attn.v_proj(x).view(tokens, -1, head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        keys, values = self.kv.keys[layer], self.kv.values[layer]
        keys.index_copy_(0, inputs.slots, k)
        values.index_copy_(0, inputs.slots, v)
        out = torch.empty_like(q)
        decode = inputs.decode
        if decode is not None:
            qd = q[decode.index][:, :, None, :]  # [B, H, 1, D]
            kd = keys[decode.table].transpose(1, 2)  # [B, Hkv, L, D]
            vd = values[decode.table].transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=decode.mask, scale=attn.scaling, enable_gqa=True)
            out[decode.index] = o[:, :, 0, :]
        for flat, start, end, table in inputs.prefills:
            n = end - start
            qp = q[flat : flat + n].transpose(0, 1)[None]  # [1, H, n, D]
            kp = keys[table].transpose(0, 1)[None]  # [1, Hkv, end, D]
            vp = values[table].transpose(0, 1)[None]
            if start == 0:
                o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=attn.scaling, enable_gqa=True)
            else:
                causal = torch.ones(n, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=causal, scale=attn.scaling, enable_gqa=True)
            out[flat : flat + n] = o[0].transpose(0, 1)
        return attn.o_proj(out.reshape(tokens, -1))
