"""Load a model and its tokenizer ready for batched generation on the chosen device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from streamer.models.cache import ensure_cached
from streamer.models.default import DEFAULT_MODEL_NAME, default_gguf
from streamer.models.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "streamer" / "models"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# Errors transformers raises for a directory it cannot use; anything else is a bug worth a traceback.
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)


@dataclass
class LoadedModel:
    """A model in eval mode on `device`, with a left-padding tokenizer that has a pad token."""

    model: PreTrainedModel
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    directory: Path | None = None
    manifest: dict[str, Any] | None = None  # a compressed artifact's manifest.json, reported by the worker


def load_model(
    path: Path | None,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path = DEFAULT_CACHE_DIR,
    device_map: str | dict[str, int | str] | None = None,
    weights: bool = True,
) -> LoadedModel:
    """Load `path` (a transformers model directory, or a .gguf file), or the default model if None.

    `device_map` (accelerate's: "auto" or module name -> device) splits the weights across devices;
    `device` is then where inputs go (the embeddings' device). `weights=False` builds only the model's
    skeleton (config, generation config, parameters on the meta device) next to the real tokenizer: for
    a parent process whose engine processes load the weights themselves.

    GGUF files go through the local cache, since reading them directly takes ~20 s every start.
    """
    where = Path(path).expanduser() if path is not None else Path(DEFAULT_MODEL_NAME)
    dev = resolve_device(device, where)
    dt = resolve_dtype(dtype, dev, where)
    directory, name = _model_directory(path, Path(cache_dir).expanduser())
    manifest = None
    if not weights:
        model, manifest, name = _skeleton(directory, dt, name)
    elif (directory / "manifest.json").is_file():
        model, manifest, name = _load_artifact(directory, dev, dt)
    else:
        model = _load_weights(directory, dev, dt, device_map)
        if device_map is not None:
            dev = model.get_input_embeddings().weight.device
    tokenizer = _load_tokenizer(directory)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, device=dev, dtype=dt, directory=directory, manifest=manifest
    )


def _load_artifact(directory: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, dict[str, Any], str]:
    """A `streamer compress` artifact: rebuilt as its manifest says, named `dir (recipe of source)`."""
    from streamer.compress.artifact import load
    from streamer.errors import StreamerError

    try:
        model, manifest = load(directory, device, dtype)
    except (*_LOAD_ERRORS, StreamerError) as exc:
        raise ModelLoadError(directory, f"compressed artifact: {exc}") from exc
    return model, manifest.model_dump(mode="json"), _artifact_name(directory, manifest)


def _artifact_name(directory: Path, manifest: Any) -> str:
    return f"{directory.name} ({manifest.recipe} of {Path(manifest.source).name})"


def _skeleton(directory: Path, dtype: torch.dtype, name: str) -> tuple[Any, dict[str, Any] | None, str]:
    """The model's structure without its weights (meta tensors: running it fails loudly), and its name."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if (directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory, local_files_only=True)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(directory, f"{type(exc).__name__}: {exc}") from exc
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("pytorch_model*.bin")):
        # the engine processes would fail to load it, again and again: say so at start instead
        raise ModelLoadError(directory, "no weights here (*.safetensors or pytorch_model*.bin)")
    if not (directory / "manifest.json").is_file():
        return model.eval(), None, name
    from streamer.compress.manifest import Manifest

    manifest = Manifest.read(directory)
    return model.eval(), manifest.model_dump(mode="json"), _artifact_name(directory, manifest)


def resolve_device(device: str, where: Path) -> torch.device:
    """`auto` picks CUDA when present; an explicit CUDA request without CUDA is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(where, f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(where, f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device, where: Path) -> torch.dtype:
    """`auto` is bfloat16 on CUDA (fast, half the memory) and float32 on CPU (bf16 matmuls are slow there)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(where, f"unknown dtype {dtype!r}; use auto or one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _model_directory(path: Path | None, cache_dir: Path) -> tuple[Path, str]:
    """The transformers directory to load, and the model's name for answers."""
    if path is None:
        return ensure_cached(default_gguf(), cache_dir, name=DEFAULT_MODEL_NAME), DEFAULT_MODEL_NAME
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ensure_cached(path, cache_dir), path.stem
    if not path.exists():
        raise ModelLoadError(path, "no such directory")
    if not path.is_dir():
        raise ModelLoadError(path, "not a directory (expected a transformers model directory or a .gguf)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(path, "no config.json here: not a transformers model directory")
    return path, path.name


def _load_weights(directory: Path, device: torch.device, dtype: torch.dtype,
                  device_map: str | dict[str, int | str] | None = None) -> PreTrainedModel:
    """The model in eval mode with gradients off, on `device` (or where `device_map` puts each module)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True,
                                                     device_map=device_map)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(directory, f"{type(exc).__name__}: {exc}") from exc
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_tokenizer(directory: Path) -> Any:
    """Left padding keeps every prompt's end next to its first generated token in a batch."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(directory, f"tokenizer: {type(exc).__name__}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(directory, "the tokenizer has no chat template (is this an instruct model?)")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(directory, "the tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
