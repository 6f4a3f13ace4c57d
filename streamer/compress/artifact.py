"""Write a compressed model as a self-describing directory, and rebuild it from its manifest.

Float results (pruned, factorized, distilled) are safetensors; an int8-dynamic model is a state dict
of quantized tensors (`quantized.pt`, read back with `weights_only=True`). Loading builds the model
from its config, rebuilds low-rank factor modules, re-applies dynamic quantization, loads the
weights, then applies what only exists on a device (torchao GPU quantization, 2:4 sparse kernels).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from streamer.compress import lowrank, prune, quantize
from streamer.compress.errors import CompressError
from streamer.compress.manifest import Manifest

QUANTIZED = "quantized.pt"
SAFETENSORS = "model.safetensors"


def save(model: nn.Module, tokenizer, manifest: Manifest, directory: Path) -> None:
    """Weights, config, generation config, tokenizer, then the manifest (last: it marks completion)."""
    directory.mkdir(parents=True, exist_ok=True)
    if manifest.weights == QUANTIZED:
        model.config.save_pretrained(directory)
        model.generation_config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / QUANTIZED)
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    manifest.write(directory)


def load(directory: Path, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Manifest]:
    """The model described by `directory/manifest.json`, in eval mode on `device`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    manifest = Manifest.read(directory)
    recipes = [s.recipe for s in manifest.steps]
    if "int8-dynamic" in recipes and device.type != "cpu":
        raise CompressError(f"{directory} is int8-dynamic, which runs on CPU only; load it with device=cpu")
    for scheme in quantize.GPU_SCHEMES:
        if scheme in recipes:
            quantize.require_gpu_scheme(scheme)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if manifest.weights == QUANTIZED else dtype)
    if (step := manifest.step("lowrank")) is not None:
        lowrank.rebuild(model, step.structure["ranks"])
    if (step := manifest.step("int8-dynamic")) is not None:
        if "int8_weight_only" not in step.structure:  # fp16 layers: the recipe before weight-only int8
            raise CompressError(f"{directory} was compressed by an older streamer; run `streamer compress` again")
        quantize.int8_dynamic(model, step.structure["int8_weight_only"])
        state = torch.load(directory / QUANTIZED, weights_only=True)
    else:
        state = load_file(directory / SAFETENSORS)
    _load_state(model, state, directory)
    model.generation_config = GenerationConfig.from_pretrained(directory, local_files_only=True)
    model.to(device)
    for scheme in quantize.GPU_SCHEMES:
        if scheme in recipes:
            quantize.apply_gpu(model, scheme)
    if "prune-2:4" in recipes and device.type == "cuda":
        prune.to_semi_structured(model)
    model.eval()
    model.requires_grad_(False)
    return model, manifest


def _load_state(model: nn.Module, state: dict, directory: Path) -> None:
    """Strict but for tied weights, which safetensors stores once and `tie_weights` restores."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CompressError(f"{directory}: weights do not match (missing {missing}, unexpected {unexpected})")
    if missing:
        model.tie_weights()


def publish(tmp: Path, out: Path) -> None:
    """Move a finished artifact into place; an existing non-empty `out` is never overwritten."""
    if out.exists():
        if any(out.iterdir()):
            raise CompressError(f"{out} exists and is not empty")
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), str(out))
