"""The OpenAI-compatible API's request validation, response shapes and errors, over a fake pool (no model)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from streamer.api import Completion, GenerationError, to_messages
from streamer.config import LimitsSettings
from streamer.serve.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    add_openai_routes,
    apply_stop,
    invalid_request,
)


class FakePool:
    """Answers with the last message reversed; records what it was asked."""

    model = "fake-model"

    def __init__(self) -> None:
        self.calls: list[tuple[Sequence[Mapping[str, str]], int, float]] = []

    async def generate(self, prompt: Sequence[Mapping[str, str]], max_new_tokens: int = 64,
                       temperature: float = 0.0, deadline_ms: float | None = None) -> Completion:
        self.calls.append((prompt, max_new_tokens, temperature))
        text = prompt[-1]["content"][::-1]
        if text == "liaf":
            raise GenerationError("boom")
        return Completion(text, tokens_in=5, tokens_out=3, queued_ms=1.0, latency_ms=2.0, model=self.model)

    async def stream(self, prompt: Sequence[Mapping[str, str]], max_new_tokens: int = 64,
                     temperature: float = 0.0, deadline_ms: float | None = None) -> AsyncIterator[str | Completion]:
        """The same answer in two pieces, then the completion, as the engine-backed pool streams."""
        done = await self.generate(prompt, max_new_tokens, temperature, deadline_ms)
        half = len(done.text) // 2
        yield done.text[:half]
        yield done.text[half:]
        yield done


@pytest.fixture
async def client() -> AsyncIterator[tuple[TestClient[web.Request, web.Application], FakePool]]:
    pool = FakePool()
    app = web.Application()
    add_openai_routes(app, pool, LimitsSettings(max_new_tokens=100))  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as http:
        yield http, pool


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hello"}], **extra}


def test_chat_request_maps_developer_role_and_text_parts() -> None:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "top_p": 0.9, "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]}
    )
    assert [m.as_worker_message() for m in req.messages] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert req.temperature == 1.0 and not req.stream  # OpenAI's defaults


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    (chat(messages=[]), "messages"),
    (chat(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
    (chat(n=2), "n"),
    (chat(temperature=3), "temperature"),
    (chat(max_tokens=0), "max_tokens"),
])
def test_invalid_chat_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    error = invalid_request(info.value)
    assert error.status == 400 and error.body.error.param == param
    assert error.body.error.type == "invalid_request_error" and param in error.body.error.message


def test_completion_request_rejects_echo_and_token_prompts() -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).prompts == ["a", "b"]
    for bad in ({"model": "m", "prompt": "a", "echo": True}, {"model": "m", "prompt": [1, 2]}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)


def test_apply_stop_cuts_at_the_earliest_stop() -> None:
    assert apply_stop("one. two! three", ["!", "."]) == ("one", True)
    assert apply_stop("no stops", ["?"]) == ("no stops", False)


def test_to_messages() -> None:
    assert to_messages("hi") == ({"role": "user", "content": "hi"},)
    for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user"}]):
        with pytest.raises(ValueError):
            to_messages(bad)


async def test_http_errors_use_openai_shape(client: tuple[TestClient[Any, Any], FakePool]) -> None:
    http, pool = client
    cases = [
        (b"{not json", 400),
        (json.dumps(chat(temperature=-1)).encode(), 400),
        (json.dumps(chat(max_tokens=101)).encode(), 400),  # over the server's cap
        (json.dumps(chat(messages=[{"role": "user", "content": "fail"}])).encode(), 500),
    ]
    for body, status in cases:
        response = await http.post("/v1/chat/completions", data=body)
        assert response.status == status, await response.text()
        error = ErrorResponse.model_validate(await response.json()).error
        assert error.message and error.type == ("server_error" if status == 500 else "invalid_request_error")
    assert len(pool.calls) == 1  # only the valid request reached the pool


async def test_chat_completion_shape(client: tuple[TestClient[Any, Any], FakePool]) -> None:
    http, pool = client
    response = await http.post("/v1/chat/completions", json=chat(max_tokens=3, temperature=0, stop="l"))
    body = await response.json()
    assert response.status == 200
    assert body["object"] == "chat.completion" and body["model"] == "fake-model"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "o"},
                                "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert pool.calls == [([{"role": "user", "content": "hello"}], 3, 0.0)]
    openai_types = pytest.importorskip("openai.types.chat")
    openai_types.ChatCompletion.model_validate(body)


async def test_streamed_chat_is_sse_chunks_then_done(client: tuple[TestClient[Any, Any], FakePool]) -> None:
    http, _ = client
    response = await http.post("/v1/chat/completions",
                               json=chat(stream=True, stream_options={"include_usage": True}))
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in (await response.text()).split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "olleh"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8
    openai_types = pytest.importorskip("openai.types.chat")
    for c in chunks:
        openai_types.ChatCompletionChunk.model_validate(c)


async def test_completions_one_choice_per_prompt(client: tuple[TestClient[Any, Any], FakePool]) -> None:
    http, pool = client
    response = await http.post("/v1/completions", json={"model": "m", "prompt": ["ab", "cd"]})
    body = await response.json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "ba"), (1, "dc")]
    assert body["object"] == "text_completion" and body["usage"]["total_tokens"] == 16
    assert {max_new for _, max_new, _ in pool.calls} == {16}  # OpenAI's legacy default
    openai_types = pytest.importorskip("openai.types")
    openai_types.Completion.model_validate(body)


async def test_models_lists_the_one_model(client: tuple[TestClient[Any, Any], FakePool]) -> None:
    http, _ = client
    body = await (await http.get("/v1/models")).json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["fake-model"]


def test_stop_scanner_holds_back_only_what_could_start_a_stop_sequence() -> None:
    from streamer.serve.openai import StopScanner

    scanner = StopScanner(["END"])
    assert scanner.feed("Hello E") == ("Hello", False)  # " E" could begin "END"
    assert scanner.feed("N") == (" ", False)
    assert scanner.feed("Dless") == ("", True)  # the stop spanned three pieces
    plain = StopScanner([])
    assert plain.feed("abc") == ("abc", False) and plain.flush() == ""
    tail = StopScanner(["xyz"])
    assert tail.feed("ax") == ("", False) and tail.flush() == "ax"
