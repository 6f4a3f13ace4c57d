"""One root type for every error streamer raises on purpose, so callers can tell ours from bugs."""


class StreamerError(Exception):
    """Root of every error streamer raises on purpose."""


class ConfigError(StreamerError):
    """The settings are invalid; the message names the field."""
