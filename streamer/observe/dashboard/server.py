"""`streamer dashboard`: the dashboard on a port of its own, for any streamer deployment's Redis."""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import redis.asyncio as aioredis
from aiohttp import web
from pydantic import SecretStr
from redis.exceptions import RedisError

from streamer.observe.dashboard.routes import add_dashboard
from streamer.state.redis import StateUnavailable

log = logging.getLogger(__name__)

_SHUTDOWN_S = 5.0  # event streams end on shutdown by themselves; nothing else is long-lived


async def run_dashboard(redis_url: str, prefix: str, host: str, port: int, *, token: SecretStr | None = None,
                        max_streams: int = 16) -> None:
    """Serve the dashboard until cancelled. Fails fast, naming the problem, when Redis is unreachable,
    rather than serving a page that can only show errors. Port 0 picks a free port (the URL says which).
    `token` and `max_streams` as in `add_dashboard`."""
    await _ping(redis_url)
    if token is None and not _loopback(host):
        log.warning("the dashboard serves every answer to anyone who reaches %s: set a token", host)
    app = web.Application()
    add_dashboard(app, redis_url, prefix, token=token, max_streams=max_streams)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = int(runner.addresses[0][1])
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else f"[{host}]" if ":" in host else host
        signed = "?token=…" if token is not None else ""
        print(f"dashboard on http://{shown}:{bound}/{signed} (Redis prefix {prefix!r})", flush=True)
        await asyncio.Event().wait()  # until cancelled
    finally:
        await runner.cleanup()


async def _ping(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise StateUnavailable(f"cannot reach Redis for the dashboard: {exc}") from None
    finally:
        await client.aclose()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
