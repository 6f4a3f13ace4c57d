"""`python -m streamer` runs the `streamer` command."""

from streamer.cli import app

app()
