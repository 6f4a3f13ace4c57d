"""The dashboard's HTTP side: the page, a JSON snapshot of Redis, and a server-sent event stream.

It reads only the keys of the README's "Redis data model", exactly as a user's own dashboard would,
so it shows any streamer deployment (a standalone `streamer dashboard` or the service's own port)
and breaks only when that documented contract does. The browser loads `/api/snapshot` each time its
event stream (re)opens and merges what `/api/events` pushes after it, deduplicating by id.

What it may cost is bounded: every Redis command goes through one pool of `_POOL` connections, the
event streams share one set of readers (live.py), and at most `max_streams` are open at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from pydantic import SecretStr
from redis.exceptions import RedisError

from streamer.observe.dashboard.access import Access
from streamer.observe.dashboard.live import LiveFeed
from streamer.observe.dashboard.snapshot import read_snapshot
from streamer.state.keys import Keys

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# The page renders model output and user text with textContent only; the policy is a second fence.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

CLIENT_NAME = "streamer-dashboard"
_POOL = 8  # Redis connections per process: the stream readers hold 2, snapshots and ticks share the rest
_POOL_WAIT_S = 5.0  # a request waits this long for a free connection, then gets a 503
_RETRY_AFTER_S = "5"  # what a browser turned away for lack of a live-stream slot is told


def add_dashboard(app: web.Application, redis_url: str, prefix: str, *, token: SecretStr | None = None,
                  max_streams: int = 16, limit: int = 50, recent_per_key: int = 5) -> None:
    """Mount `GET /`, `/static/{name}`, `/api/snapshot` and `/api/events` on `app` (before it starts).

    `token` (observe.auth_token): every one of them asks for it (access.py). `max_streams`
    (observe.max_live_streams): event streams served at once; more get a 503 and their browser retries.
    It is a function on the app rather than a bare route table because the event streams are endless
    responses: `on_shutdown` ends them, or aiohttp would wait out its shutdown timeout (60 s) for them.
    """
    dashboard = _Dashboard(redis_url, Keys(prefix), max_streams, limit, recent_per_key)
    access = Access(token)
    app.router.add_get("/", access.guard(dashboard.page, page=True))
    app.router.add_get("/static/{name}", access.guard(dashboard.asset))
    app.router.add_get("/api/snapshot", access.guard(dashboard.snapshot))
    app.router.add_get("/api/events", access.guard(dashboard.events))
    app.cleanup_ctx.append(dashboard.redis_client)
    app.on_shutdown.append(dashboard.end_streams)


class _Dashboard:
    """Request handlers sharing one bounded Redis connection pool and one live feed per app."""

    def __init__(self, redis_url: str, keys: Keys, max_streams: int, limit: int, recent_per_key: int) -> None:
        self._url = redis_url
        self._keys = keys
        self._max_streams = max_streams
        self._limit = limit
        self._recent = recent_per_key
        self._client: aioredis.Redis | None = None
        self._feed: LiveFeed | None = None
        self._open_streams = 0

    async def redis_client(self, _: web.Application) -> AsyncIterator[None]:
        # Named, so CLIENT LIST tells an operator which connections are the dashboard's.
        pool = aioredis.BlockingConnectionPool.from_url(self._url, max_connections=_POOL, timeout=_POOL_WAIT_S,
                                                        decode_responses=True, client_name=CLIENT_NAME)
        self._client = aioredis.Redis.from_pool(pool)
        self._feed = LiveFeed(self._client, self._keys)
        try:
            yield
        finally:
            await self._client.aclose()

    async def end_streams(self, _: web.Application) -> None:
        """Let each open event stream finish its response (or cancel one stuck writing to a browser)."""
        self.feed.end_all()

    @property
    def client(self) -> aioredis.Redis:
        assert self._client is not None, "the app has not started"
        return self._client

    @property
    def feed(self) -> LiveFeed:
        assert self._feed is not None, "the app has not started"
        return self._feed

    async def page(self, _: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers=_headers("text/html; charset=utf-8"))

    async def asset(self, request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        if name not in _ASSETS:  # a fixed list: no path from the URL ever reaches the file system
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers=_headers(_ASSETS[name]))

    async def snapshot(self, request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", self._limit, 1, 500)
        try:
            body = await read_snapshot(self.client, self._keys, limit, self._recent)
        except RedisError as exc:
            log.warning("dashboard snapshot: Redis failed: %r", exc)
            return web.json_response({"error": f"Redis: {exc}"}, status=503)
        return web.Response(body=orjson.dumps(body), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """SSE: `answer` and `dead_letter` (XREAD BLOCK), `window` (SUBSCRIBE), `tick` (counters, each second).

        The stream joins the live feed before the response starts, so everything written after the
        browser sees the stream open, and so after its snapshot, arrives here; `$` would leave a gap.
        """
        if self._open_streams >= self._max_streams:
            raise web.HTTPServiceUnavailable(text="too many live dashboards open; retrying shortly\n",
                                             headers={"Retry-After": _RETRY_AFTER_S})
        self._open_streams += 1
        try:
            return await self._stream(request)
        finally:
            self._open_streams -= 1

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        handler = asyncio.current_task()
        assert handler is not None
        try:
            listener = await self.feed.join(handler)
        except RedisError as exc:  # the page retries the stream itself after an error status
            log.warning("dashboard events: Redis failed: %r", exc)
            raise web.HTTPServiceUnavailable(text=f"Redis: {exc}") from None
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        try:
            await response.prepare(request)
            await response.write(b"retry: 2000\n\n")
            while (chunk := await listener.queue.get()) is not None:
                await response.write(chunk)
        except ConnectionResetError:  # the browser went away: a write to its closed socket failed
            pass
        finally:
            await self.feed.leave(listener)
        return response


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    try:
        return min(high, max(low, int(request.query.get(name, default))))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None


def _headers(content_type: str) -> dict[str, str]:
    return {"Content-Type": content_type, "Cache-Control": "no-cache", "Content-Security-Policy": _CSP,
            "X-Content-Type-Options": "nosniff"}
