"""Errors a compress run reports as one clear line (the CLI maps them to an exit code)."""

from streamer.errors import StreamerError


class CompressError(StreamerError):
    """A recipe cannot run here (wrong device, bad option, missing corpus) or an artifact is unusable."""


class GateFailed(CompressError):
    """The compressed model's quality fell outside the configured bounds; `--force` keeps it anyway."""
