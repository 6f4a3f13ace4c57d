"""Convert a GGUF once into a plain transformers directory.

Loading the GGUF costs ~20 s (dequantizing every tensor); loading the safetensors copy costs
under half a second, so every start after the first one is fast.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streamer.models.errors import ModelLoadError

log = logging.getLogger(__name__)

MARKER = "streamer-cache.json"  # written last: its presence means the directory is complete
HASH_CHARS = 12
STALE_TEMP_S = 3600  # temp dirs older than this are leftovers of a crashed conversion


def content_hash(path: Path) -> str:
    """sha256 of the file's bytes, so a changed GGUF gets a new cache entry (~0.1 s for 100 MB)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_entry(gguf: Path, cache_dir: Path, name: str | None = None) -> Path:
    """Where the cache of `gguf` lives: `cache_dir/<name>-<short content hash>`."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name or gguf.stem)
    return Path(cache_dir) / f"{safe}-{content_hash(gguf)[:HASH_CHARS]}"


def is_complete(entry: Path) -> bool:
    """True when a conversion finished into `entry` (the marker is the last file written)."""
    return (entry / MARKER).is_file() and (entry / "config.json").is_file()


def ensure_cached(gguf: Path, cache_dir: Path, *, name: str | None = None) -> Path:
    """Return the cache directory for `gguf`, converting it first if needed.

    The conversion writes into a temp dir next to the target and renames it into place, so a
    crash never leaves a half-written cache that a later start would trust.
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelLoadError(gguf, "GGUF file not found")
    entry = cache_entry(gguf, cache_dir, name)
    if is_complete(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(entry.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        with _progress(f"Converting {gguf.name} into a local model cache (once, ~20 s)"):
            _convert(gguf, tmp)
        _publish(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return entry


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF and write safetensors, config, generation config and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # `dequantize=True` makes transformers drop its GGUF quantizer once the weights are dense.
    # Without it the (already dense) model keeps `hf_quantizer`, whose `is_serializable()` is
    # False, and `save_pretrained` refuses; `config.json` would also carry a GGUF
    # `quantization_config` that breaks loading the copy.
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(gguf, f"transformers cannot read this GGUF: {exc}") from exc
    if getattr(model, "hf_quantizer", None) is not None:
        raise ModelLoadError(gguf, "transformers kept the weights quantized; cannot write a dense copy")
    model.save_pretrained(out)  # tied embeddings are stored once and re-tied on load
    tokenizer.save_pretrained(out)
    _write_marker(gguf, out)
    _make_readable(out)


def _write_marker(gguf: Path, out: Path) -> None:
    """Record where the cache came from; written last so it also marks completion."""
    import transformers

    info = {"source": str(gguf), "sha256": content_hash(gguf), "transformers": transformers.__version__}
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _make_readable(out: Path) -> None:
    """mkdtemp (and the safetensors writer) create owner-only modes; a cache is meant to be shared."""
    out.chmod(0o755)
    for file in out.iterdir():
        file.chmod(0o644)


def _publish(tmp: Path, entry: Path) -> None:
    """Rename the finished temp dir into place; losing a race to another process is fine."""
    if entry.exists() and not is_complete(entry):
        shutil.rmtree(entry)  # an incomplete entry cannot come from us (we rename whole dirs)
    try:
        os.rename(tmp, entry)
    except OSError as exc:
        if not is_complete(entry):
            raise ModelLoadError(entry, f"cannot move the converted model into place: {exc}") from exc


def _remove_stale_temps(cache_dir: Path) -> None:
    """Delete temp dirs left by conversions that crashed (recent ones may still be in progress)."""
    now = time.time()
    for tmp in cache_dir.glob(".tmp-*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


@contextmanager
def _progress(message: str) -> Iterator[None]:
    """A spinner on a terminal plus log lines, since the conversion looks like a hang otherwise."""
    from rich.console import Console

    log.info("%s ...", message)
    start = time.perf_counter()
    with Console(stderr=True).status(message):
        yield
    log.info("model cache written in %.1f s", time.perf_counter() - start)
