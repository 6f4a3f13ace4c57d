"""A fault-injecting HTTP proxy in front of a real model server, for the openai backend's failure tests.

It forwards every request to the upstream (streamed answers stream through) unless told otherwise: to
answer a status (429 with Retry-After, 503, ...) or to stall without answering, for the next N calls to
the chat endpoint or until healed; or to go away altogether (stop listening: connections are refused) and
come back on the same port. It can also drop fields from every chat call's JSON body before forwarding it
(`drop`), as a server that ignores them would. It counts what it saw, dropped and answered itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

CHAT = "/v1/chat/completions"
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}


@dataclass
class _Fault:
    status: int | None  # None: stall (answer nothing until the client gives up)
    remaining: int | None  # calls left to answer this way; None: until healed
    retry_after: str | None = None


@dataclass
class FaultProxy:
    upstream_root: str  # http://127.0.0.1:PORT, the server without /v1
    port: int = 0
    seen: Counter[str] = field(default_factory=Counter)  # path -> requests received
    faulted: Counter[str] = field(default_factory=Counter)  # "429", "503", "stall" -> answered by the proxy
    chat_times: list[float] = field(default_factory=list)  # monotonic arrival of each chat call
    drop: frozenset[str] = frozenset()  # fields removed from each chat call's body (a server that ignores them)
    dropped: Counter[str] = field(default_factory=Counter)  # field -> chat calls it was removed from
    _fault: _Fault | None = None
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        await self.back()

    async def stop(self) -> None:
        await self.away()
        if self._session is not None:
            await self._session.close()

    async def away(self) -> None:
        """Stop listening: new connections are refused, as from a server that is down."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def back(self) -> None:
        """Listen (again, on the same port)."""
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def answer(self, status: int, times: int | None = None, retry_after: str | None = None) -> None:
        """Answer the next `times` chat calls (None: all, until healed) with `status`."""
        self._fault = _Fault(status, times, retry_after)

    def stall(self, times: int | None = None) -> None:
        """Hold the next `times` chat calls without answering."""
        self._fault = _Fault(None, times)

    def heal(self) -> None:
        self._fault = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen[request.path] += 1
        if request.path == CHAT:
            self.chat_times.append(time.monotonic())
            if (fault := self._take_fault()) is not None:
                return await self._inject(fault)
            if self.drop:
                return await self._forward(request, self._dropped(await request.read()))
        return await self._forward(request)

    def _dropped(self, body: bytes) -> bytes:
        sent = json.loads(body)
        for name in self.drop & sent.keys():
            del sent[name]
            self.dropped[name] += 1
        return json.dumps(sent).encode()

    def _take_fault(self) -> _Fault | None:
        fault = self._fault
        if fault is None:
            return None
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._fault = None
        return fault

    async def _inject(self, fault: _Fault) -> web.StreamResponse:
        if fault.status is None:
            self.faulted["stall"] += 1
            await asyncio.sleep(3600)  # the client's read timeout ends it first
            raise web.HTTPGatewayTimeout()
        self.faulted[str(fault.status)] += 1
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
        return web.json_response({"error": {"code": fault.status, "message": "injected by the fault proxy"}},
                                 status=fault.status, headers=headers)

    async def _forward(self, request: web.Request, body: bytes | None = None) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in {"host", *_HOP_HEADERS}}
        data = await request.read() if body is None else body
        async with self._session.request(request.method, self.upstream_root + request.path_qs, headers=headers,
                                         data=data) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
