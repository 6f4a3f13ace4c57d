"""A live dashboard over streamer's Redis state: answers, windows, throughput, latency, dead letters.

`add_dashboard` mounts it on any aiohttp app (the service's own HTTP port); `run_dashboard` serves it
alone (`streamer dashboard`). It reads only the documented Redis keys, never the service's memory.
"""

from streamer.observe.dashboard.routes import add_dashboard
from streamer.observe.dashboard.server import run_dashboard

__all__ = ["add_dashboard", "run_dashboard"]
