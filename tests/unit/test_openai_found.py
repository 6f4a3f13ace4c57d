"""engine.kind openai (streamer/engine/openai) against the answers that broke it: a fake OpenAI-compatible
server (aiohttp, in the test) answers exactly what each case needs. Each test states a behaviour RELIABILITY.md
promises (an adversarial review found each one broken; they are kept as its specification)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from streamer.config import OpenAISettings
from streamer.contracts import ErrorCode
from streamer.engine.openai import OpenAIBackend
from streamer.engine.openai.retry import Backoff, Failure, classify_status
from streamer.engine.requests import Generated, GenRequest, GenResult, ScoreRequest, ScoreResult

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def tokenizer() -> Tokenizer:
    tok = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return tok


def chat(text: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": text},)


def prompt_of(body: dict[str, Any]) -> str:
    return " ".join(m.get("content", "") for m in body.get("messages", []))


async def sse(request: web.Request, pieces: list[str], done: bool = True, usage: bool = True,
              finish: bool = True) -> web.StreamResponse:
    """A streamed answer; finish=False ends it cleanly after the pieces, as a connection lost mid-answer."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in pieces:
        event = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
    if not finish:
        await response.write_eof()
        return response
    last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    await response.write(f"data: {json.dumps(last)}\n\n".encode())
    if usage:
        await response.write(b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n')
    if done:
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


@dataclass
class FakeServer:
    """/v1/models, /tokenize (404 unless set), /v1/chat/completions: each a replaceable handler."""

    chat: Handler
    models: Handler | None = None
    tokenize: Handler | None = None
    calls: dict[str, int] = field(default_factory=lambda: {"models": 0, "chat": 0, "tokenize": 0})
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.calls["models"] += 1
        if self.models is not None:
            return await self.models(request)
        return web.json_response({"data": [{"id": "m"}]})

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        self.calls["tokenize"] += 1
        if self.tokenize is not None:
            return await self.tokenize(request)
        return web.Response(status=404)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.calls["chat"] += 1
        return await self.chat(request)


async def ok_chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body.get("stream"):
        return await sse(request, ["Hi", " there"])
    return web.json_response({"choices": [{"message": {"content": '"positive"'}}],
                              "usage": {"prompt_tokens": 3}})


def settings(base_url: str, **extra: Any) -> OpenAISettings:
    fields: dict[str, Any] = {"retry_base_s": 0.01, "retry_max_s": 0.05, "circuit_failures": 2,
                              "circuit_open_s": 0.1, "read_timeout_s": 5.0, "connect_timeout_s": 1.0, **extra}
    return OpenAISettings(base_url=base_url, model="m", **fields)


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    fake = FakeServer(chat=ok_chat)
    await fake.start()
    yield fake
    await fake.stop()


async def backend_on(server: FakeServer, **extra: Any) -> OpenAIBackend:
    backend = OpenAIBackend(settings(server.base_url, **extra), tokenizer(), max_queue=16, default_deadline_ms=60_000)
    await backend.start()
    return backend


async def close(backend: OpenAIBackend) -> None:
    """aclose, but a test must not hang if it does: report it instead."""
    try:
        await asyncio.wait_for(backend.aclose(), 3.0)
    except TimeoutError:
        pytest.fail("aclose() did not return within 3 s (the backend is wedged)")


# --- the circuit: an odd /models answer to the probe is a failed probe, never a wedged circuit -----------------

async def test_an_odd_models_answer_to_the_probe_is_a_failed_probe_and_the_circuit_closes_later(
        server: FakeServer) -> None:
    """Server 'away' (chat 500s) opens the circuit; the half-open probe meets a gateway's 200 with
    {"data": null}; then everything is healthy again. The circuit must close once the server answers, and the
    queued request be answered (a probe that crashed would leave it half-open, free_slots() 0, for ever)."""
    failing = {"chat": 2, "probe": 1}

    async def chat_handler(request: web.Request) -> web.StreamResponse:
        if failing["chat"] > 0:
            failing["chat"] -= 1
            return web.Response(status=500, text="boom")
        return await ok_chat(request)

    async def models_handler(request: web.Request) -> web.StreamResponse:
        if server.calls["models"] > 1 and failing["probe"] > 0:  # the first call is start()'s check
            failing["probe"] -= 1
            return web.json_response({"data": None})
        return web.json_response({"data": [{"id": "m"}]})

    server.chat, server.models = chat_handler, models_handler
    backend = await backend_on(server)
    try:
        future = backend.submit(GenRequest(chat("hello"), max_new_tokens=2))
        try:
            generated = await asyncio.wait_for(asyncio.shield(future), 3.0)
        except TimeoutError:
            pytest.fail(f"request never answered; circuit {backend._circuit.state.value}, "
                        f"free_slots {backend.free_slots()}, models calls {server.calls['models']}")
        assert generated.result.error is None
        assert backend.free_slots() > 0
    finally:
        await close(backend)


# --- token counts: a /tokenize answer that is not UTF-8 leaves the local count, the request goes on ------------

async def test_an_undecodable_tokenize_answer_leaves_the_local_count_and_the_request_is_answered(
        server: FakeServer) -> None:
    """/tokenize answers 200 with a body that is not UTF-8 (a proxy's page, a server bug). The request must
    still be queued and answered (lost, its event's commit point would never move and aclose() would wait for
    it for ever)."""

    async def tokenize(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b'{"count": "\xff\xfe"}', content_type="application/json")

    server.tokenize = tokenize
    backend = await backend_on(server)
    try:
        future = backend.submit(GenRequest(chat("hello"), max_new_tokens=2))
        try:
            generated = await asyncio.wait_for(asyncio.shield(future), 3.0)
        except TimeoutError:
            pytest.fail(f"request lost: never queued (depth {backend.depth}, inflight_tokens "
                        f"{backend.inflight_tokens}, chat calls {server.calls['chat']})")
        assert isinstance(generated, Generated)
    finally:
        await close(backend)


# --- a request the server fails on its own (5xx, or slower than read_timeout_s) ends with an error ---------------

@pytest.mark.parametrize("how", ["http_500", "slower_than_read_timeout"])
async def test_a_request_the_server_fails_while_answering_others_ends_with_an_error_and_the_circuit_stays_closed(
        server: FakeServer, how: str) -> None:
    """One event whose request the server fails every time while it answers every other request: a
    deterministic 500 (a prompt that crashes the server's template or grammar), or a prefill longer than
    read_timeout_s. 'One bad record never stops anything': after max_request_failures failures of its own it
    ends with an error (a model_error dead letter), and its failures never open the circuit (which would
    pause every partition) while the others succeed."""

    async def chat_handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if "POISON" in prompt_of(body):
            if how == "http_500":
                return web.Response(status=500, text='{"error": "Internal error: template failure"}')
            await asyncio.sleep(2.0)
        return await ok_chat(request)

    async def others() -> None:
        while True:
            await backend.generate(GenRequest(chat("hello"), max_new_tokens=2))
            await asyncio.sleep(0.02)

    server.chat = chat_handler
    backend = await backend_on(server, read_timeout_s=0.3)
    traffic = asyncio.create_task(others())
    poison = backend.submit(GenRequest(chat("POISON"), max_new_tokens=2))
    opened = 0
    try:
        for _ in range(40):  # 4 s
            await asyncio.sleep(0.1)
            opened += not backend.alive
            if poison.done():
                break
        assert poison.done(), (f"the poison request was tried for 4 s and is still pending (never dead-lettered); "
                               f"the circuit was open in {opened} of 40 samples")
        result = poison.result().result
        assert result.error is not None and result.error_code in (None, ErrorCode.MODEL_ERROR), result
        assert opened == 0, f"its failures opened the circuit in {opened} samples"
    finally:
        traffic.cancel()
        if poison.done():
            await close(backend)
        else:
            poison.cancel()  # aclose() would wait for it for ever (it answers every request taken)


async def test_a_lone_request_failing_while_nothing_else_answers_is_retried_not_dead_lettered(
        server: FakeServer) -> None:
    """The same 500, but no other request is answered (the server is broken, not this request): nothing
    shows the failure is the request's own, so it is retried, however many times, never dead-lettered."""

    async def chat_handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="engine dead")

    server.chat = chat_handler
    backend = await backend_on(server)
    future = backend.submit(GenRequest(chat("hello"), max_new_tokens=2))
    try:
        await asyncio.sleep(1.0)
        assert server.calls["chat"] > 4 and not future.done()  # 4: max_request_failures by default
    finally:
        future.cancel()


# --- a stream retried after partial output: the streamed pieces join to the final text ---------------------------

async def test_a_stream_retried_after_partial_output_never_streams_text_the_answer_does_not_hold(
        server: FakeServer) -> None:
    """Attempt 1 streams 'Hello wor' and the connection is lost; attempt 2 (temperature > 0, or a
    batch-nondeterministic server) answers 'Goodbye world'. The caller saw 'Hello wor': appending the retry's
    text from character 9 would give it 'Hello wororld'. The call ends with an error instead, its pieces
    the text shown before."""
    attempts = {"n": 0}

    async def chat_handler(request: web.Request) -> web.StreamResponse:
        attempts["n"] += 1
        if attempts["n"] == 1:
            return await sse(request, ["Hello", " wor"], done=False, usage=False, finish=False)
        return await sse(request, ["Goodbye", " world"])

    server.chat = chat_handler
    backend = await backend_on(server)
    try:
        parts = [p async for p in backend.stream(GenRequest(chat("hello"), max_new_tokens=8, temperature=0.8))]
        *pieces, final = parts
        assert isinstance(final, Generated) and isinstance(final.result, GenResult)
        assert "".join(str(p) for p in pieces) == "Hello wor", pieces
        assert final.result.error is not None, final.result
    finally:
        await close(backend)


# --- a stream that ends cleanly after its finish_reason is complete, [DONE] or not ------------------------------

async def test_a_complete_stream_without_done_marker_is_an_answer(server: FakeServer) -> None:
    """The stream carries every piece, finish_reason 'stop' and the usage, then the server closes it without
    'data: [DONE]' (some gateways and older compatible servers): that is the answer, not a lost connection
    (retried without limit, it would open the circuit and stall the pipeline)."""

    async def chat_handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, ["Hi", " there"], done=False)

    server.chat = chat_handler
    backend = await backend_on(server)
    future = backend.submit(GenRequest(chat("hello"), max_new_tokens=2))
    try:
        try:
            generated = await asyncio.wait_for(asyncio.shield(future), 2.0)
        except TimeoutError:
            pytest.fail(f"a complete answer was retried {server.calls['chat']} times in 2 s and never returned")
        assert isinstance(generated.result, GenResult) and generated.result.text == "Hi there"
    finally:
        if future.done():
            await close(backend)
        else:
            future.cancel()


# --- failure classes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [408, 425])
def test_transient_4xx_statuses_are_retried(status: int) -> None:
    """408 Request Timeout (a proxy or load balancer timing out the upstream) and 425 Too Early mean 'try
    again', not a dead letter after one try."""
    assert classify_status(status, "Request Timeout").retried


def test_tgi_context_error_is_context_too_long() -> None:
    """TGI's 422 for a prompt over its context is a context_too_long dead letter, not a model_error."""
    tgi = ('{"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 '
           '`inputs` tokens and 200 `max_new_tokens`","error_type":"validation"}')
    assert classify_status(422, tgi) is Failure.CONTEXT
    assert Failure.CONTEXT.value == ErrorCode.CONTEXT_TOO_LONG.value


def test_a_retry_after_is_honoured_up_to_six_times_retry_max_s() -> None:
    """A Retry-After of a day (a misconfigured proxy) would hold its requests a day with the circuit closed."""
    assert Backoff(0.2, 10.0).wait_s(1, random.Random(1), retry_after_s=86_400.0) == 60.0


# --- classify --------------------------------------------------------------------------------------------------

async def test_classify_answer_in_plain_words_is_read_as_its_label(server: FakeServer) -> None:
    """classify: choice against a server that ignores response_format (or a model that adds a period):
    'Positive.' is the label 'positive', as tasks.prompts.snap_to_label reads a resident model's answer."""

    async def chat_handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"choices": [{"message": {"content": "Positive."}}], "usage": {"prompt_tokens": 3}})

    server.chat = chat_handler
    backend = await backend_on(server, classify="choice")
    try:
        scored = (await asyncio.wait_for(backend.generate(ScoreRequest(chat("hello"), ("positive", "negative"))),
                                         3.0)).result
        assert isinstance(scored, ScoreResult)
        assert scored.error is None and scored.label == "positive", scored.error
    finally:
        await close(backend)


async def test_one_answer_without_logprobs_does_not_switch_classify_auto_for_good(server: FakeServer) -> None:
    """classify: auto. One completion comes back without logprobs (a transient gateway answer, a server
    restarting with other flags); every later one has them. The later ones are still scored by their
    log-probabilities (switching to choice for good would change label distributions silently)."""
    answers = {"n": 0}

    async def chat_handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        answers["n"] += 1
        if body.get("logprobs") and answers["n"] > 1:
            top = [{"token": "positive", "logprob": -0.1}, {"token": "negative", "logprob": -2.5}]
            return web.json_response({"choices": [{"message": {"content": "positive"},
                                                   "logprobs": {"content": [{"token": "positive", "logprob": -0.1,
                                                                             "top_logprobs": top}]}}]})
        return web.json_response({"choices": [{"message": {"content": '"positive"'}}]})

    server.chat = chat_handler
    backend = await backend_on(server, classify="auto")
    try:
        request = ScoreRequest(chat("hello"), ("positive", "negative"))
        await asyncio.wait_for(backend.generate(request), 3.0)  # the one answer without logprobs
        later = (await asyncio.wait_for(backend.generate(request), 3.0)).result
        assert isinstance(later, ScoreResult)
        assert later.scores == {"positive": -0.1, "negative": -2.5}, later.scores
    finally:
        await close(backend)


# --- closing ---------------------------------------------------------------------------------------------------

async def test_aclose_cut_off_by_a_timeout_still_closes_the_connections(server: FakeServer) -> None:
    """aclose() waits for every request taken; a caller that gives up on it (a shutdown deadline) must not
    leave the HTTP connections open."""

    async def chat_handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5.0)
        return await ok_chat(request)

    server.chat = chat_handler
    backend = await backend_on(server)
    future = backend.submit(GenRequest(chat("hello"), max_new_tokens=2))
    await asyncio.sleep(0.1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(backend.aclose(), 0.2)
    future.cancel()
    assert backend._client._session is None


# --- held: cases the review tried that already behaved ------------------------------------------------------------

async def test_a_prompt_bigger_than_the_token_budget_still_goes(server: FakeServer) -> None:
    backend = await backend_on(server, max_inflight_tokens=2)
    try:
        results = await asyncio.wait_for(asyncio.gather(*(
            backend.submit(GenRequest(chat("hello " * 50), max_new_tokens=8)) for _ in range(3))), 5.0)
        assert all(isinstance(r.result, GenResult) and r.result.error is None for r in results)
        assert backend.inflight_tokens == 0 and backend.depth == 0
    finally:
        await close(backend)


async def test_a_429_storm_cuts_the_limit_to_its_floor_and_it_recovers(server: FakeServer) -> None:
    left = {"n": 30}

    async def chat_handler(request: web.Request) -> web.StreamResponse:
        if left["n"] > 0:
            left["n"] -= 1
            return web.Response(status=429, headers={"Retry-After": "0"})
        return await ok_chat(request)

    server.chat = chat_handler
    backend = await backend_on(server, max_concurrency=8)
    try:
        results = await asyncio.wait_for(asyncio.gather(*(
            backend.submit(GenRequest(chat("hello"), max_new_tokens=2)) for _ in range(16))), 10.0)
        assert all(r.result.error is None for r in results)
        assert backend.free_slots() == 16 and backend.limit >= 1
    finally:
        await close(backend)


async def test_context_too_long_is_dead_lettered_with_its_code_and_the_circuit_stays_closed(
        server: FakeServer) -> None:
    async def chat_handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"type": "exceed_context_size_error",
                                            "message": "the request exceeds the available context size"}},
                                 status=400)

    server.chat = chat_handler
    backend = await backend_on(server)
    try:
        for _ in range(4):
            generated = await asyncio.wait_for(backend.generate(GenRequest(chat("hello"), max_new_tokens=2)), 3.0)
            assert generated.result.error_code == ErrorCode.CONTEXT_TOO_LONG
        assert backend.alive and backend.free_slots() == 16
    finally:
        await close(backend)


async def test_a_stream_retried_after_partial_output_streams_only_the_rest_of_a_matching_answer(
        server: FakeServer) -> None:
    """Attempt 1 streams 'Hello wor' and the connection is lost; attempt 2 answers 'Hello world': the caller
    gets 'ld' more, and the pieces join to the final text."""
    attempts = {"n": 0}

    async def chat_handler(request: web.Request) -> web.StreamResponse:
        attempts["n"] += 1
        if attempts["n"] == 1:
            return await sse(request, ["Hello", " wor"], done=False, usage=False, finish=False)
        return await sse(request, ["Hello", " world"])

    server.chat = chat_handler
    backend = await backend_on(server)
    try:
        *pieces, final = [p async for p in backend.stream(GenRequest(chat("hello"), max_new_tokens=8))]
        assert isinstance(final, Generated) and isinstance(final.result, GenResult)
        assert final.result.error is None and "".join(str(p) for p in pieces) == final.result.text == "Hello world"
    finally:
        await close(backend)
