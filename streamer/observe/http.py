"""The service's HTTP port: Prometheus metrics and the liveness/readiness probes of ops/k8s.

streamer takes no requests over HTTP; this port only shows the process. `build_app` returns a plain
aiohttp Application so other features (a dashboard) add their routes to the same port, either as
`extra_routes` or later with `app.add_routes(...)` before `serve`. Metrics and probes stay open (k8s and
Prometheus call them); features that show data check a bearer token with `bearer` and `same_secret`.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

from aiohttp import web

from streamer.observe.metrics import Metrics

log = logging.getLogger(__name__)

Readiness = Callable[[], Awaitable[dict[str, bool]]]
Probe = Callable[[], object]
"""A readiness probe: sync or async; ready when it returns anything but False without raising."""

Problem = Callable[[], str | None]
"""Liveness: why the process should be restarted, or None while it is healthy."""

METRICS_KEY = web.AppKey("metrics", Metrics)
READINESS_KEY = web.AppKey("readiness", Readiness)
LIVENESS_KEY = web.AppKey("liveness", Problem)

_READINESS_TIMEOUT_S = 2.5  # under the probe's timeoutSeconds (3) in ops/k8s/deployment.yaml


def _healthy() -> str | None:
    return None


def build_app(metrics: Metrics, readiness: Readiness, liveness: Problem = _healthy,
              extra_routes: Iterable[Iterable[web.AbstractRouteDef]] = ()) -> web.Application:
    """GET /metrics, /healthz and /readyz, plus any route tables given (e.g. a dashboard's)."""
    app = web.Application()
    app[METRICS_KEY] = metrics
    app[READINESS_KEY] = readiness
    app[LIVENESS_KEY] = liveness
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    for routes in extra_routes:
        app.add_routes(routes)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start listening; `stop(runner)` undoes it. Port 0 picks a free port (see `bound_port`)."""
    # No access log: Prometheus and the probes call every few seconds and would drown the real logs.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("http on %s:%d (/metrics, /healthz, /readyz)", host, bound_port(runner))
    return runner


async def stop(runner: web.AppRunner) -> None:
    """Close the listening socket and the open connections."""
    await runner.cleanup()


def bound_port(runner: web.AppRunner) -> int:
    """The port actually listened on (useful after asking for port 0)."""
    return int(runner.addresses[0][1])


def readiness_of(probes: Mapping[str, Probe], *, timeout_s: float = 2.0) -> Readiness:
    """Combine named probes into a readiness check; each runs concurrently and counts as not ready
    when it raises or takes longer than `timeout_s`, so one hung dependency shows by name."""

    async def check() -> dict[str, bool]:
        names = list(probes)
        results = await asyncio.gather(*(_probe(name, probes[name], timeout_s) for name in names))
        return dict(zip(names, results, strict=True))

    return check


def bearer(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if the request has one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def same_secret(given: str | None, secret: str) -> bool:
    """Constant-time comparison, so response times do not tell how much of a guess was right."""
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


async def _probe(name: str, probe: Probe, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            result = probe()
            if inspect.isawaitable(result):
                result = await result
    except Exception as exc:  # a failing dependency is exactly what readiness reports
        log.debug("readiness probe %s failed: %r", name, exc)
        return False
    return result is not False


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": Metrics.CONTENT_TYPE})


async def _healthz(request: web.Request) -> web.Response:
    """200 while the process does its work (or cannot, for a reason a restart would not fix); 503 with
    the reason otherwise, so a supervisor restarts it."""
    problem = request.app[LIVENESS_KEY]()
    if problem is not None:
        return web.json_response({"status": "failing", "problem": problem}, status=503)
    return web.json_response({"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    """200 when every check is true, else 503; the body names each check, so a probe failure says why."""
    try:
        async with asyncio.timeout(_READINESS_TIMEOUT_S):
            checks = await request.app[READINESS_KEY]()
    except Exception as exc:
        log.warning("readiness check failed: %r", exc)
        return web.json_response({"readiness": False}, status=503)
    problem = request.app[LIVENESS_KEY]()
    if problem is not None:
        checks = {**checks, "alive": False}
    return web.json_response(checks, status=200 if all(checks.values()) else 503)
