"""Who may read the dashboard, and what its readers may cost: with `observe.auth_token` set, the page and
`/api/*` need the token (metrics and probes stay open); live-update streams are capped per process, and
however many are open, they share one set of Redis readers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from streamer.config import RedisSettings
from streamer.contracts import Answer, Source
from streamer.observe.dashboard.routes import CLIENT_NAME, add_dashboard
from streamer.observe.http import build_app
from streamer.observe.metrics import Metrics
from streamer.state.redis import RedisState, Written
from tests.integration.services import unique_name

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"
DASHBOARD = ["/", "/static/app.js", "/static/style.css", "/api/snapshot", "/api/events"]

Make = Callable[..., Awaitable[TestClient]]


async def ready() -> dict[str, bool]:
    return {"model": True}


@pytest.fixture
async def dashboard_app(redis_url: str) -> AsyncIterator[Make]:
    """The service's HTTP port (metrics, probes) with the dashboard mounted as `streamer run` mounts it."""
    clients: list[TestClient] = []

    async def make(**options: object) -> TestClient:
        app = build_app(Metrics(), ready)
        add_dashboard(app, redis_url, unique_name("dash-access"), **options)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def status(client: TestClient, path: str, headers: dict[str, str] | None = None) -> int:
    async with client.get(path, headers=headers, allow_redirects=False) as response:
        return response.status


async def test_with_a_token_the_page_and_api_need_it_and_metrics_and_probes_stay_open(dashboard_app) -> None:
    client = await dashboard_app(token=SecretStr(TOKEN))
    for path in DASHBOARD:
        assert await status(client, path) == 401, path
        assert await status(client, path, bearer("wrong")) == 401, path
        assert await status(client, path, bearer(TOKEN)) == 200, path
    assert [await status(client, path) for path in ("/metrics", "/healthz", "/readyz")] == [200, 200, 200]


async def test_a_token_in_the_page_address_becomes_a_session_cookie_the_browser_sends_itself(dashboard_app) -> None:
    client = await dashboard_app(token=SecretStr(TOKEN))
    async with client.get(f"/?token={TOKEN}", allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"] == "./"  # the token leaves the address bar and the history
        cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age" not in cookie
    assert TOKEN not in cookie
    for path in DASHBOARD:  # the test client keeps the cookie, as a browser does
        assert await status(client, path) == 200, path
    assert await status(client, "/?token=wrong") == 401


async def test_without_a_token_the_dashboard_is_open(dashboard_app) -> None:
    client = await dashboard_app()
    assert [await status(client, path) for path in DASHBOARD] == [200] * len(DASHBOARD)


async def sse_names(response: aiohttp.ClientResponse, wanted: str, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while (await response.content.readline()).decode().rstrip("\n") != f"event: {wanted}":
            pass


async def redis_readers(client: redis.Redis) -> int:
    """The dashboard's connections blocked in XREAD or subscribed: what its open event streams hold."""
    clients = await asyncio.to_thread(client.client_list)
    return sum(c.get("name") == CLIENT_NAME and (c.get("cmd") == "xread" or c.get("sub", "0") != "0")
               for c in clients)


async def test_live_streams_are_capped_and_share_one_set_of_redis_readers(redis_url: str) -> None:
    prefix = unique_name("dash-live")
    app = web.Application()
    add_dashboard(app, redis_url, prefix, max_streams=3)
    state = RedisState(RedisSettings(prefix=prefix), redis_url)
    admin = redis.Redis.from_url(redis_url)
    async with TestClient(TestServer(app)) as client, contextlib.AsyncExitStack() as streams:
        opened = [await streams.enter_async_context(client.get("/api/events")) for _ in range(3)]
        assert [r.status for r in opened] == [200, 200, 200]
        for response in opened:
            await sse_names(response, "tick")
        assert await status(client, "/api/events") == 503  # one more than max_streams
        assert await redis_readers(admin) == 2  # one XREAD and one SUBSCRIBE, whatever the number of streams

        record = Answer(id="q1", key="k", task="answer", output="o", model="m", tokens_in=1, tokens_out=1,
                        queued_ms=0, latency_ms=1, source=Source(topic="in", partition=0, offset=0), ts_in=0,
                        ts_out=0)
        await state.write([Written(record, record.model_dump_json().encode(), "k", "qa")])
        for response in opened:  # every stream gets it
            await sse_names(response, "answer")

        opened.pop().close()
        assert await eventually(lambda: status(client, "/api/events"), 200)  # the freed slot is taken again
    assert await eventually(lambda: redis_readers(admin), 0)  # every stream closed: the readers go too
    await state.aclose()
    admin.close()


async def eventually(read: Callable[[], Awaitable[int]], wanted: int, timeout_s: float = 5) -> bool:
    deadline = time.monotonic() + timeout_s
    while await read() != wanted:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True
