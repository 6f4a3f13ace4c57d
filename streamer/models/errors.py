"""Errors raised while finding or loading a model, so callers can report them instead of crashing."""

from pathlib import Path

from streamer.errors import StreamerError


class ModelNotFoundError(StreamerError):
    """The default model's weights are not installed; the message says how to install them."""


class ModelLoadError(StreamerError):
    """A model directory is missing or unusable; carries the path and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load model from {self.path}: {reason}")
