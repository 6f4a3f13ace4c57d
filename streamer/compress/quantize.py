"""Quantization recipes, all from libraries PyTorch maintains rather than hand-written kernels.

- `int8-dynamic` (CPU): `torch.ao.quantization.quantize_dynamic` — per-channel int8 weights and
  dynamic int8 activations on fbgemm/oneDNN kernels (after `smooth`); embeddings become int8 rows.
  Its activation scale is one per input tensor (7-bit on x86), which a few Linears cannot take: on
  SmolLM2-135M nearly all the damage is in `down_proj`, whose input carries per-token outliers that
  smoothing (per channel) cannot move. The most sensitive of those keep fp16 weights and float
  activations (`quantize_dynamic`'s float16 path): measured on calibration text, not guessed.
  Activations use the full 8 bits where the CPU has AVX512-VNNI (torch defaults to 7 on x86 to
  avoid 16-bit saturation in pre-VNNI kernels); on SmolLM2 that alone lifts agreement 66% -> 80%.
- `int8-weight`, `int4-weight` (group-wise) and `fp8` (Hopper+) on CUDA: torchao's `quantize_`
  configs, applied after loading because their tensor subclasses are device-specific.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from streamer.compress.errors import CompressError

CPU_SCHEMES = ("int8-dynamic",)
GPU_SCHEMES = ("int8-weight", "int4-weight", "fp8")
INT4_GROUP_SIZE = 128
FP16_SHARE = 2 / 3  # of the down_proj layers, most sensitive first; SmolLM2 stays within 35% of fp32 bytes
SENSITIVITY_TOKENS = 256  # of the calibration text: ranking runs one forward per candidate


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


def int8_dynamic(model: nn.Module, fp16: Sequence[str] = ()) -> nn.Module:
    """Swap every Linear for an int8 dynamic one (those named in `fp16` for fp16-weight ones) and
    every Embedding for int8 rows, in place."""
    from torch.ao.quantization import (
        float16_dynamic_qconfig,
        float_qparams_weight_only_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )
    from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

    if any(p.device.type != "cpu" for p in model.parameters()):
        raise CompressError("int8-dynamic runs on CPU kernels; load the model on CPU (use int8-weight on CUDA)")
    spec = {nn.Linear: per_channel_dynamic_qconfig, nn.Embedding: float_qparams_weight_only_qconfig}
    spec |= {name: float16_dynamic_qconfig for name in fp16}  # a name overrides its type's config
    mapping = get_default_dynamic_quant_module_mappings() | {nn.Linear: _dynamic_linear(full_range_activations())}
    return quantize_dynamic(model, spec, dtype=torch.qint8, mapping=mapping, inplace=True)


@torch.inference_mode()
def most_sensitive(model: nn.Module, ids: torch.Tensor, names: Sequence[str]) -> list[str]:
    """`names` ordered by how far the logits on `ids` move (KL) when only that Linear is int8."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    dynamic_linear = _dynamic_linear(full_range_activations())
    reference = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1).flatten(0, 1)
    damage = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        owner, linear = model.get_submodule(parent), model.get_submodule(name)
        linear.qconfig = per_channel_dynamic_qconfig
        setattr(owner, child, dynamic_linear.from_float(linear))
        try:
            logits = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1).flatten(0, 1)
        finally:
            setattr(owner, child, linear)
            del linear.qconfig
        damage[name] = float(F.kl_div(logits, reference, log_target=True, reduction="batchmean"))
    return sorted(names, key=damage.__getitem__, reverse=True)


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
