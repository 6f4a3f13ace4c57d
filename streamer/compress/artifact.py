"""Write a compressed model as a self-describing directory, and rebuild it from its manifest.

Weights are safetensors: float results (pruned, factorized, distilled) as transformers writes them,
an int8-dynamic model as its state dict (int8 weights and float scales). Loading builds the model
from its config, rebuilds low-rank factor modules and the int8 modules, loads the weights, then
applies what only exists on a device (torchao GPU quantization, 2:4 sparse kernels).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from streamer.compress import lowrank, prune, quantize
from streamer.compress.errors import CompressError
from streamer.compress.manifest import Manifest

SAFETENSORS = "model.safetensors"


def save(model: nn.Module, tokenizer, manifest: Manifest, directory: Path) -> None:
    """Weights, config, generation config, tokenizer, then the manifest (last: it marks completion)."""
    directory.mkdir(parents=True, exist_ok=True)
    if manifest.step("int8-dynamic") is not None:  # its modules are not transformers' own
        from safetensors.torch import save_model

        model.config.save_pretrained(directory)
        model.generation_config.save_pretrained(directory)
        save_model(model, str(directory / SAFETENSORS))  # a tensor the model shares is stored once
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
    int8 = manifest.step("int8-dynamic")
    if int8 is not None and int8.structure.get("layout") != quantize.LAYOUT:
        raise CompressError(f"{directory} was compressed by an older streamer; run `streamer compress` again")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if int8 is not None else dtype)
    if (step := manifest.step("lowrank")) is not None:
        lowrank.rebuild(model, step.structure["ranks"])
    if int8 is not None and quantize.int8_dynamic(model) != int8.structure["fused"]:
        raise CompressError(f"{directory}: the model's config does not give the fused modules the manifest lists")
    _load_state(model, load_file(directory / SAFETENSORS), directory)
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
    """Strict, except for tensors stored once that the model shares (a head tied to the embedding)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    current = model.state_dict()
    loaded = {current[name].data_ptr() for name in state if name in current}
    unfilled = [name for name in missing if current[name].data_ptr() not in loaded]
    if unexpected or unfilled:
        raise CompressError(f"{directory}: weights do not match (missing {unfilled}, unexpected {unexpected})")


def publish(tmp: Path, out: Path) -> None:
    """Move a finished artifact into place; an existing non-empty `out` is never overwritten."""
    if out.exists():
        if any(out.iterdir()):
            raise CompressError(f"{out} exists and is not empty")
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), str(out))
