"""Quantization recipes, all from libraries PyTorch maintains rather than hand-written kernels.

- `int8-dynamic` (CPU): `torch.ao.quantization.quantize_dynamic` — per-channel int8 weights and
  dynamic int8 activations on fbgemm/oneDNN kernels (after `smooth`); embeddings become int8 rows.
- `int8-weight`, `int4-weight` (group-wise) and `fp8` (Hopper+) on CUDA: torchao's `quantize_`
  configs, applied after loading because their tensor subclasses are device-specific.
"""

from __future__ import annotations

import torch
from torch import nn

from streamer.compress.errors import CompressError

CPU_SCHEMES = ("int8-dynamic",)
GPU_SCHEMES = ("int8-weight", "int4-weight", "fp8")
INT4_GROUP_SIZE = 128


def int8_dynamic(model: nn.Module) -> nn.Module:
    """Swap every Linear for an int8 dynamic one and every Embedding for int8 rows, in place."""
    from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    if any(p.device.type != "cpu" for p in model.parameters()):
        raise CompressError("int8-dynamic runs on CPU kernels; load the model on CPU (use int8-weight on CUDA)")
    spec = {nn.Linear: per_channel_dynamic_qconfig, nn.Embedding: float_qparams_weight_only_qconfig}
    return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


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
