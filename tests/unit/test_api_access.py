"""Who may call the OpenAI-compatible API, and how much one request may ask: with an API key set every
/v1 route needs it; prompt and message texts are capped at `limits.max_chars`, and one /v1/completions
request at `limits.max_prompts` prompts. Refusals are OpenAI-shaped errors and never reach the model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from streamer.config import LimitsSettings
from streamer.serve.openai import ErrorResponse, add_openai_routes
from tests.unit.test_api_shapes import FakePool

KEY = "sk-test-key"
LIMITS = LimitsSettings(max_chars=10, max_prompts=2)
ROUTES = [("GET", "/v1/models", None),
          ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
          ("POST", "/v1/completions", {"model": "m", "prompt": "hi"})]


@pytest.fixture
async def served() -> AsyncIterator[tuple[TestClient[Any, Any], FakePool]]:
    pool = FakePool()
    app = web.Application()
    add_openai_routes(app, pool, LIMITS, api_key=KEY)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as http:
        yield http, pool


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def refused(response: Any, status: int) -> str:
    """The error's message, after checking it is OpenAI's shape with the expected status."""
    assert response.status == status, await response.text()
    return ErrorResponse.model_validate(await response.json()).error.message


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_route_needs_the_key(served, method: str, path: str, body: dict[str, Any] | None) -> None:
    http, pool = served
    for headers in ({}, bearer("wrong"), {"Authorization": KEY}):
        response = await http.request(method, path, json=body, headers=headers)
        assert "API key" in await refused(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await http.request(method, path, json=body, headers=bearer(KEY))).status == 200
    assert len(pool.calls) == (0 if body is None else 1)


async def test_without_a_key_the_api_is_open() -> None:
    app = web.Application()
    add_openai_routes(app, FakePool(), LIMITS)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as http:
        assert (await http.get("/v1/models")).status == 200


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x" * 11}, "prompt"),
    ({"prompt": ["ok", "x" * 11]}, "prompt.1"),
])
async def test_a_prompt_longer_than_max_chars_is_a_400(served, body: dict[str, Any], param: str) -> None:
    http, pool = served
    response = await http.post("/v1/completions", json={"model": "m", **body}, headers=bearer(KEY))
    assert "at most 10 characters" in await refused(response, 400)
    assert (await response.json())["error"]["param"] == param and pool.calls == []


@pytest.mark.parametrize("content", ["x" * 11, [{"type": "text", "text": "x" * 6}, {"type": "text", "text": "y" * 5}]])
async def test_a_chat_message_longer_than_max_chars_is_a_400(served, content: Any) -> None:
    http, pool = served
    messages = [{"role": "system", "content": "short"}, {"role": "user", "content": content}]
    for stream in (False, True):
        response = await http.post("/v1/chat/completions", json={"model": "m", "messages": messages, "stream": stream},
                                   headers=bearer(KEY))
        assert "at most 10 characters" in await refused(response, 400)
        assert (await response.json())["error"]["param"] == "messages.1.content"
    assert pool.calls == []


async def test_more_prompts_than_max_prompts_is_a_400(served) -> None:
    http, pool = served
    response = await http.post("/v1/completions", json={"model": "m", "prompt": ["a", "b", "c"]}, headers=bearer(KEY))
    assert "at most 2 prompts" in await refused(response, 400)
    assert pool.calls == []
    ok = await http.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"]}, headers=bearer(KEY))
    assert ok.status == 200
