"""The dashboard's HTTP side: the page, a JSON snapshot of Redis, and a server-sent event stream.

It reads only the keys of the README's "Redis data model", exactly as a user's own dashboard would,
so it shows any streamer deployment (a standalone `streamer dashboard` or the service's own port)
and breaks only when that documented contract does. The browser loads `/api/snapshot` each time its
event stream (re)opens and merges what `/api/events` pushes after it, deduplicating by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# The page renders model output and user text with textContent only; the policy is a second fence.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

CLIENT_NAME = "streamer-dashboard"
TICK_S = 1.0  # counters push period: the browser derives answers/s from successive ticks
_BLOCK_MS = 10_000  # one XREAD waits at most this long, so a dead stream is noticed on the next write
_RETRY_S = 1.0  # pause before reading Redis again after an error
_STREAM_BATCH = 200  # entries per XREAD reply
_QUEUE = 1000  # events buffered per browser; a slow reader blocks its own Redis readers, nobody else's
_LATEST_CAP = 1000  # `windows:latest:{route}` fields read per route (a hash per key can be huge)
_PAYLOAD_CHARS = 300  # a dead letter keeps the original bytes; the page needs only their start

Put = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True)
class Keys:
    """The documented key names under one prefix (README, "Redis data model")."""

    prefix: str

    @property
    def counters(self) -> str:
        return f"{self.prefix}:counters"

    @property
    def late(self) -> str:
        return f"{self.prefix}:late"

    @property
    def answers(self) -> str:
        return f"{self.prefix}:answers"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dead-letters"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:windows"

    @property
    def latest_head(self) -> str:
        return f"{self.prefix}:windows:latest:"

    def window(self, window_id: str) -> str:
        return f"{self.prefix}:window:{window_id}"

    def windows(self, route: str, key: str) -> str:
        return f"{self.prefix}:windows:{route}:{key}"


def add_dashboard(app: web.Application, redis_url: str, prefix: str, *, limit: int = 50,
                  recent_per_key: int = 5) -> None:
    """Mount `GET /`, `/static/{name}`, `/api/snapshot` and `/api/events` on `app` (before it starts).

    It is a function on the app rather than a bare route table because the event streams are endless
    responses: `on_shutdown` ends them, or aiohttp would wait out its shutdown timeout (60 s) for them.
    """
    dashboard = _Dashboard(redis_url, Keys(prefix), limit, recent_per_key)
    app.router.add_get("/", dashboard.page)
    app.router.add_get("/static/{name}", dashboard.asset)
    app.router.add_get("/api/snapshot", dashboard.snapshot)
    app.router.add_get("/api/events", dashboard.events)
    app.cleanup_ctx.append(dashboard.redis_client)
    app.on_shutdown.append(dashboard.end_streams)


class _Dashboard:
    """Request handlers sharing one Redis connection pool per app; each event stream has its own readers."""

    def __init__(self, redis_url: str, keys: Keys, limit: int, recent_per_key: int) -> None:
        self._url = redis_url
        self._keys = keys
        self._limit = limit
        self._recent = recent_per_key
        self._client: aioredis.Redis | None = None
        self._streams: dict[asyncio.Queue[bytes | None], asyncio.Task[Any]] = {}

    async def redis_client(self, _: web.Application) -> AsyncIterator[None]:
        # Named, so CLIENT LIST tells an operator which connections are the dashboard's.
        self._client = aioredis.Redis.from_url(self._url, decode_responses=True, client_name=CLIENT_NAME)
        try:
            yield
        finally:
            await self._client.aclose()

    async def end_streams(self, _: web.Application) -> None:
        """Let each open event stream finish its response; one stuck writing to a browser that stopped
        reading (its queue full) is cancelled instead."""
        for queue, handler in list(self._streams.items()):
            try:
                queue.put_nowait(None)
            except asyncio.QueueFull:
                handler.cancel()

    @property
    def client(self) -> aioredis.Redis:
        assert self._client is not None, "the app has not started"
        return self._client

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

        The streams' current ends are resolved before the response starts, so everything written after
        the browser sees the stream open, and so after its snapshot, arrives here; `$` would leave a gap.
        """
        client, keys = self.client, self._keys
        try:
            after = {keys.answers: await _stream_end(client, keys.answers),
                     keys.dead_letters: await _stream_end(client, keys.dead_letters)}
        except RedisError as exc:  # the page retries the stream itself after an error status
            log.warning("dashboard events: Redis failed: %r", exc)
            raise web.HTTPServiceUnavailable(text=f"Redis: {exc}") from None
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE)
        readers: list[asyncio.Task[None]] = []
        try:
            await pubsub.subscribe(keys.channel)
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
            await response.prepare(request)
            await response.write(b"retry: 2000\n\n")
            handler = asyncio.current_task()
            assert handler is not None
            self._streams[queue] = handler
            readers = [asyncio.create_task(_tail_streams(client, keys, after, queue.put)),
                       asyncio.create_task(_window_results(pubsub, queue.put)),
                       asyncio.create_task(_ticks(client, keys, queue.put))]
            while (chunk := await queue.get()) is not None:
                await response.write(chunk)
        except ConnectionResetError:  # the browser went away: a write to its closed socket failed
            pass
        finally:
            self._streams.pop(queue, None)
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await pubsub.aclose()
        return response


async def read_snapshot(client: aioredis.Redis, keys: Keys, limit: int, recent_per_key: int) -> dict[str, Any]:
    """Counters, late counts, the newest answers and dead letters, and windows: the latest result of the
    `limit` most recently updated (route, key) pairs, plus the last `recent_per_key` windows of each."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.counters)
        pipe.hgetall(keys.late)
        pipe.xrevrange(keys.answers, count=limit)
        pipe.xrevrange(keys.dead_letters, count=limit)
        counters, late, answers, dead_letters = await pipe.execute()
    latest = await _latest_windows(client, keys, limit)
    return {
        "now": _now_ms(),
        "prefix": keys.prefix,
        "counters": _ints(counters),
        "late": _ints(late),
        "answers": [a for entry_id, fields in answers if (a := _answer(entry_id, fields))],
        "dead_letters": [d for entry_id, fields in dead_letters if (d := _dead_letter(entry_id, fields))],
        "windows": {"latest": latest, "recent": await _recent_windows(client, keys, latest, recent_per_key)},
    }


async def _latest_windows(client: aioredis.Redis, keys: Keys, limit: int) -> list[dict[str, Any]]:
    head = keys.latest_head
    routes = [name[len(head):] async for name in client.scan_iter(match=_glob_escape(head) + "*", count=1000,
                                                                 _type="HASH")]
    results: list[dict[str, Any]] = []
    for route in sorted(set(routes)):
        name = head + route
        fields: dict[str, str] = {}
        async with contextlib.aclosing(client.hscan_iter(name, count=_LATEST_CAP)) as scan:
            async for field, doc in scan:
                fields[field] = doc
                if len(fields) >= _LATEST_CAP:
                    break
        results += [r for doc in fields.values() if isinstance(r := _json(doc), dict)]
    results.sort(key=lambda r: r.get("emitted_at", 0), reverse=True)
    return results[:limit]


async def _recent_windows(client: aioredis.Redis, keys: Keys, latest: list[dict[str, Any]],
                          per_key: int) -> list[dict[str, Any]]:
    """Earlier windows of the same (route, key) pairs, newest end first; expired ones are skipped."""
    if per_key < 1 or not latest:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for result in latest:
            pipe.zrevrange(keys.windows(str(result.get("route")), result.get("key") or "*"), 0, per_key - 1)
        id_lists = await pipe.execute()
    ids = list(dict.fromkeys(i for ids in id_lists for i in ids))
    async with client.pipeline(transaction=False) as pipe:
        for window_id in ids:
            pipe.hget(keys.window(window_id), "result")
        docs = await pipe.execute()
    return [r for doc in docs if doc is not None and isinstance(r := _json(doc), dict)]


async def _stream_end(client: aioredis.Redis, stream: str) -> str:
    """The id of the stream's newest entry ("0-0" when empty): XREAD after it sees only what comes next."""
    newest = await client.xrevrange(stream, count=1)
    return str(newest[0][0]) if newest else "0-0"


async def _tail_streams(client: aioredis.Redis, keys: Keys, after: dict[str, str], put: Put) -> None:
    """Answers and dead letters as they are added, in one blocking XREAD over both streams."""
    while True:
        try:
            reply = await client.xread(after, count=_STREAM_BATCH, block=_BLOCK_MS)
        except RedisError as exc:
            await put(_problem(exc))
            await asyncio.sleep(_RETRY_S)
            continue
        for stream, entries in reply.items() if isinstance(reply, dict) else reply or []:
            for entry_id, fields in entries:
                after[stream] = entry_id
                if stream == keys.answers:
                    event, item = "answer", _answer(entry_id, fields)
                else:
                    event, item = "dead_letter", _dead_letter(entry_id, fields)
                if item is not None:
                    await put(_sse(event, item))


async def _window_results(pubsub: aioredis.client.PubSub, put: Put) -> None:
    """Window results as they are published; redis-py resubscribes by itself after a reconnect."""
    while True:
        try:
            async for message in pubsub.listen():
                if message.get("type") == "message" and isinstance(result := _json(message["data"]), dict):
                    await put(_sse("window", result))
        except RedisError as exc:
            await put(_problem(exc))
            await asyncio.sleep(_RETRY_S)


async def _ticks(client: aioredis.Redis, keys: Keys, put: Put) -> None:
    """The counters and late counts every TICK_S; the browser charts rates from their deltas."""
    while True:
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.counters)
                pipe.hgetall(keys.late)
                counters, late = await pipe.execute()
            await put(_sse("tick", {"t": _now_ms(), "counters": _ints(counters), "late": _ints(late)}))
        except RedisError as exc:
            await put(_problem(exc))
        await asyncio.sleep(TICK_S)


def _answer(entry_id: str, fields: dict[str, str]) -> dict[str, Any] | None:
    answer = _json(fields.get("answer"))
    return {"stream_id": entry_id, "answer": answer} if isinstance(answer, dict) else None


def _dead_letter(entry_id: str, fields: dict[str, str]) -> dict[str, Any] | None:
    letter = _json(fields.get("dead_letter"))
    if not isinstance(letter, dict):
        return None
    if isinstance(payload := letter.get("payload"), str) and len(payload) > _PAYLOAD_CHARS:
        letter["payload"] = payload[:_PAYLOAD_CHARS] + "…"
    return {"stream_id": entry_id, "error": fields.get("error"), "dead_letter": letter}


def _json(doc: str | None) -> Any:
    """Parsed JSON, or None for a missing or malformed document (one bad entry must not blank the page)."""
    if doc is None:
        return None
    try:
        return orjson.loads(doc)
    except orjson.JSONDecodeError:
        log.debug("dashboard: skipping a malformed document: %.80s", doc)
        return None


def _sse(event: str, data: Any) -> bytes:
    # orjson never emits a raw newline, so one `data:` line always carries the whole document.
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _problem(exc: Exception) -> bytes:
    # Debug only: every reader of every open page retries each second; the page itself shows the error.
    log.debug("dashboard: Redis read failed: %r", exc)
    return _sse("problem", {"detail": f"Redis: {exc}"})


def _ints(raw: dict[str, str]) -> dict[str, int]:
    return {k: int(v) for k, v in raw.items() if v.lstrip("-").isdigit()}


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    try:
        return min(high, max(low, int(request.query.get(name, default))))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None


def _headers(content_type: str) -> dict[str, str]:
    return {"Content-Type": content_type, "Cache-Control": "no-cache", "Content-Security-Policy": _CSP,
            "X-Content-Type-Options": "nosniff"}


def _now_ms() -> int:
    return int(time.time() * 1000)
