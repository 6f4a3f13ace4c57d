"""Quantization recipes, all from libraries PyTorch maintains rather than hand-written kernels.

- `int8-dynamic` (CPU): `torch.ao.quantization.quantize_dynamic` — per-channel int8 weights and
  dynamic int8 activations on fbgemm/oneDNN kernels (after `smooth`); embeddings become int8 rows.
  Its activation scale is one per input tensor, which `down_proj` (per-token outliers that smoothing,
  per channel, cannot move) and the LM head cannot take. Those two keep float activations with int8
  weights (`Int8WeightLinear`, unsmoothed): on SmolLM2-135M (all 200 eval prompts) greedy agreement
  is 93.5% at 0.31x fp32's resident bytes, against 90.3% with only `down_proj` so, 90.4% with a
  per-token int8 head, 85.1% with the most sensitive 2/3 of `down_proj` in fp16 (0.34x; all of them:
  90.4%, 0.36x), 89.3% with every Linear weight-only but smoothed, 95.5% unsmoothed. Weight-only
  costs what dynamic int8 does for `down_proj` at one token per call (0.03 ms; the LM head 1.0 vs
  0.6 ms) but ~5x more at 32 tokens (prefill, large batches), hence only where activations need
  it. Activations use the full 8 bits where the CPU has AVX512-VNNI (torch defaults to 7 on x86 to
  avoid 16-bit saturation in pre-VNNI kernels).
- `int8-weight`, `int4-weight` (group-wise) and `fp8` (Hopper+) on CUDA: torchao's `quantize_`
  configs, applied after loading because their tensor subclasses are device-specific.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
from torch import nn

from streamer.compress.errors import CompressError
from streamer.compress.prune import decoder_linears

CPU_SCHEMES = ("int8-dynamic",)
GPU_SCHEMES = ("int8-weight", "int4-weight", "fp8")
INT4_GROUP_SIZE = 128


def full_range_activations() -> bool:
    """Whether fbgemm's int8 GEMM here accumulates u8*s8 products without saturating (VNNI)."""
    try:
        return "avx512_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@cache  # one class per process, so isinstance holds across models
def _dynamic_linear(full_range: bool) -> type[nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if not full_range:
        return DynamicLinear

    class FullRangeLinear(DynamicLinear):
        """torch's dynamic int8 Linear with 8-bit rather than 7-bit activations."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self._packed_params.dtype != torch.qint8:
                return super().forward(x)
            packed = self._packed_params._packed_params
            return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False).to(x.dtype)

    return FullRangeLinear


class Int8WeightLinear(nn.Module):
    """A Linear with int8 weights (one scale per output channel) and float activations, on PyTorch's
    `_weight_int8pack_mm` CPU kernel (gpt-fast's int8 weight-only path).

    Activations enter as bfloat16: the kernel's float32 path is ~10x slower here, and rounding them
    to bf16 (2^-9) costs far less than one int8 scale per input tensor. The weight is a frozen int8
    Parameter, so parameter counts, resident bytes and the state dict see it like any other weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear) -> Int8WeightLinear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        weight = linear.weight.detach().float()
        module.scales.copy_(weight.abs().amax(1).clamp(min=1e-8) / 127)
        module.weight.copy_(torch.round(weight / module.scales.float()[:, None]).clamp(-128, 127))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).to(x.dtype)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def weight_only_layers(model: nn.Module) -> list[str]:
    """The Linears that keep float activations: every plain `down_proj`, and an untied LM head."""
    names = [name for name in decoder_linears(model) if name.endswith("mlp.down_proj")]
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.weight is not model.get_input_embeddings().weight:
        names.append(next(name for name, m in model.named_modules() if m is head))
    return names


def int8_dynamic(model: nn.Module, weight_only: Sequence[str] = ()) -> nn.Module:
    """Swap the Linears named in `weight_only` for `Int8WeightLinear`, every other Linear for an int8
    dynamic one, and every Embedding for int8 rows, in place."""
    from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig, quantize_dynamic
    from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

    if any(p.device.type != "cpu" for p in model.parameters()):
        raise CompressError("int8-dynamic runs on CPU kernels; load the model on CPU (use int8-weight on CUDA)")
    for name in weight_only:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8WeightLinear.from_float(model.get_submodule(name)))
    spec = {nn.Linear: per_channel_dynamic_qconfig, nn.Embedding: float_qparams_weight_only_qconfig}
    mapping = get_default_dynamic_quant_module_mappings() | {nn.Linear: _dynamic_linear(full_range_activations())}
    return quantize_dynamic(model, spec, dtype=torch.qint8, mapping=mapping, inplace=True)


def require_gpu_scheme(scheme: str) -> None:
    """Fail before any work when a GPU-only scheme is asked for where it cannot run."""
    if not torch.cuda.is_available():
        raise CompressError(f"{scheme} needs a CUDA GPU (torchao kernels); on CPU use int8-dynamic")
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        raise CompressError("fp8 needs compute capability 8.9+ (Ada/Hopper)")
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise CompressError(f"{scheme} needs torchao: pip install 'streamer[compress-gpu]'") from exc


def apply_gpu(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize a CUDA model's Linear weights in place with torchao."""
    require_gpu_scheme(scheme)
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    configs = {
        "int8-weight": lambda: Int8WeightOnlyConfig(),
        "int4-weight": lambda: Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE),
        "fp8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    }
    if scheme not in configs:
        raise CompressError(f"unknown GPU scheme {scheme!r}; choose one of {', '.join(configs)}")
    quantize_(model, configs[scheme]())
    return model
