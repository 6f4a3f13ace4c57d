"""Token counts without the server: a local `tokenizers` tokenizer (no torch), for `count_tokens`, which
runs on the event loop and so may do no network I/O, and for the budget of a request the server cannot
count."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from streamer.config import ModelSettings
from streamer.errors import StreamerError
from streamer.models.cache import cache_entry, is_complete
from streamer.models.default import DEFAULT_MODEL_NAME, default_gguf


class TokenizerMissing(StreamerError):
    """engine.openai.tokenizer names no tokenizer.json, or the default model's is not converted yet."""


def load_tokenizer(path: Path | None) -> Tokenizer:
    """`path`: a tokenizer.json or a directory holding one; None: the default model's converted cache."""
    if path is None:
        entry = cache_entry(default_gguf(), ModelSettings().cache_dir, DEFAULT_MODEL_NAME)
        if not is_complete(entry):
            raise TokenizerMissing(f"engine.openai.tokenizer is unset and the default model's tokenizer is not in "
                                   f"{entry} yet: set it to the served model's tokenizer.json, or run "
                                   "`streamer demo` once to convert the default model")
        path = entry
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for a missing or malformed file
        raise TokenizerMissing(f"engine.openai.tokenizer: cannot load {file}: {exc}") from None


def count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)
