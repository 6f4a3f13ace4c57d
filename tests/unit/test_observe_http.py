"""The HTTP port: metrics text, liveness, readiness by check, extra routes, serving on a real socket."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from streamer.observe.http import bound_port, build_app, readiness_of, serve, stop
from streamer.observe.metrics import Metrics

Readiness = Callable[[], Awaitable[dict[str, bool]]]


def fixed(checks: dict[str, bool]) -> Readiness:
    async def readiness() -> dict[str, bool]:
        return checks

    return readiness


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[web.Application], Awaitable[TestClient]]]:
    clients: list[TestClient] = []

    async def make(app: web.Application) -> TestClient:
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def test_metrics_serves_the_registry_as_prometheus_text(client_for) -> None:
    metrics = Metrics()
    metrics.events_in("questions")
    client = await client_for(build_app(metrics, fixed({})))
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == Metrics.CONTENT_TYPE
    assert 'streamer_events_in_total{route="questions"} 1.0' in await response.text()


async def test_healthz_is_alive_even_when_not_ready(client_for) -> None:
    client = await client_for(build_app(Metrics(), fixed({"kafka": False})))
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "alive"}


async def test_readyz_is_200_when_every_check_passes(client_for) -> None:
    checks = {"model": True, "kafka": True, "redis": True}
    client = await client_for(build_app(Metrics(), fixed(checks)))
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == checks


async def test_readyz_is_503_naming_the_failing_check(client_for) -> None:
    checks = {"model": True, "kafka": True, "redis": False}
    client = await client_for(build_app(Metrics(), fixed(checks)))
    response = await client.get("/readyz")
    assert response.status == 503
    assert await response.json() == checks


async def test_readyz_is_503_when_the_check_itself_fails(client_for) -> None:
    async def broken() -> dict[str, bool]:
        raise RuntimeError("boom")

    client = await client_for(build_app(Metrics(), broken))
    response = await client.get("/readyz")
    assert response.status == 503
    assert await response.json() == {"readiness": False}


async def test_readiness_of_runs_sync_and_async_probes_and_names_failures() -> None:
    async def ping() -> None:  # like RedisState.ping: returns nothing, raises when down
        raise ConnectionError("redis down")

    async def hangs() -> bool:
        await asyncio.sleep(60)
        return True

    async def fine() -> None:
        return None

    check = readiness_of({"model": lambda: True, "kafka": lambda: False, "redis": ping, "slow": hangs,
                          "state": fine}, timeout_s=0.05)
    assert await check() == {"model": True, "kafka": False, "redis": False, "slow": False, "state": True}


async def test_extra_routes_and_later_routes_share_the_port(client_for) -> None:
    dashboard = web.RouteTableDef()

    @dashboard.get("/dashboard")
    async def page(_: web.Request) -> web.Response:
        return web.Response(text="dashboard")

    app = build_app(Metrics(), fixed({}), extra_routes=[dashboard])
    app.router.add_get("/later", page)
    client = await client_for(app)
    assert await (await client.get("/dashboard")).text() == "dashboard"
    assert (await client.get("/later")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_serve_listens_and_stop_closes() -> None:
    runner = await serve(build_app(Metrics(), fixed({"model": True})), "127.0.0.1", 0)
    port = bound_port(runner)
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as response:
            assert response.status == 200
    finally:
        await stop(runner)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{port}/healthz")
