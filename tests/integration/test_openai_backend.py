"""engine.kind openai against a real llama.cpp llama-server: every task, the context-too-long dead-letter
code, a refused key, and (through a fault proxy) backoff, the adaptive limit and the circuit, with every
request answered exactly once and none failed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from streamer.config import EngineSettings
from streamer.contracts import ErrorCode
from streamer.engine.openai import OpenAIBackend, RemoteObserver, ServerRefused, open_backend
from streamer.engine.requests import Generated, GenRequest, GenResult, ScoreRequest, ScoreResult
from tests.integration.fault_proxy import FaultProxy
from tests.integration.services import LlamaServer, llama_service

pytestmark = pytest.mark.integration

LABELS = ("positive", "negative")
REVIEW = "Review: 'I love it, works perfectly!' Is the review positive or negative? Answer with one word."


def chat(text: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": text},)


@dataclass
class Recorder(RemoteObserver):
    """Keeps what the backend reports, in order."""

    limits: list[int] = field(default_factory=list)
    circuit: list[str] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)
    first_tokens: int = 0

    def remote_limit(self, server: str, limit: int) -> None:
        if not self.limits or self.limits[-1] != limit:
            self.limits.append(limit)

    def remote_circuit(self, server: str, state: str) -> None:
        self.circuit.append(state)

    def remote_retry(self, server: str, cause: str) -> None:
        self.retries.append(cause)

    def remote_first_token(self, server: str, seconds: float) -> None:
        self.first_tokens += 1


def settings(base_url: str, **openai: Any) -> EngineSettings:
    return EngineSettings(kind="openai", openai={"base_url": base_url, "model": "smollm2", **openai})


async def started(base_url: str, recorder: Recorder | None = None, **openai: Any) -> OpenAIBackend:
    backend = open_backend(settings(base_url, **openai), max_queue=16, observer=recorder)
    await backend.start()
    return backend


@pytest.fixture
async def proxy(llama_server: LlamaServer) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(llama_server.base_url.removesuffix("/v1"))
    await proxy.start()
    yield proxy
    await proxy.stop()


def short(i: int) -> GenRequest:
    return GenRequest(chat(f"Count to {i}."), max_new_tokens=2)


async def answered_once(backend: OpenAIBackend, n: int) -> list[Generated]:
    """Submit n short requests at once; each future resolves once (a second set_result would raise)."""
    results = await asyncio.gather(*(backend.submit(short(i)) for i in range(n)))
    assert [r.result.error for r in results] == [None] * n
    assert all(isinstance(r.result, GenResult) and r.result.tokens_out >= 1 for r in results)
    assert backend.depth == 0 and backend.inflight_tokens == 0
    return results


async def test_generate_and_stream_answer_through_chat_completions(llama_server: LlamaServer) -> None:
    recorder = Recorder()
    backend = await started(llama_server.base_url, recorder)
    try:
        generated = await backend.generate(GenRequest(chat("What is Kafka?"), max_new_tokens=4))
        assert isinstance(generated.result, GenResult) and generated.result.text
        assert generated.result.tokens_out == 4 and generated.result.tokens_in > 5  # from the server's usage
        parts = [part async for part in backend.stream(GenRequest(chat("Say hello."), max_new_tokens=4))]
        *pieces, final = parts
        assert pieces and all(isinstance(p, str) for p in pieces) and isinstance(final, Generated)
        assert isinstance(final.result, GenResult) and "".join(pieces).strip() == final.result.text
        assert final.first_token_ms is not None and recorder.first_tokens == 2
        assert backend.info.where == llama_server.base_url and backend.kv_stats() is None
        assert backend.count_tokens("Hello world") == 2  # the local tokenizer agrees with llama-server's /tokenize
    finally:
        await backend.aclose()


@pytest.mark.parametrize("mode", ["logprobs", "choice"])
async def test_classify_returns_one_of_the_labels(llama_server: LlamaServer, mode: str) -> None:
    backend = await started(llama_server.base_url, classify=mode)
    try:
        scored = (await backend.generate(ScoreRequest(chat(REVIEW), LABELS))).result
        assert isinstance(scored, ScoreResult) and scored.error is None
        assert scored.label in LABELS and set(scored.scores) == set(LABELS)
        assert scored.scores[scored.label] == max(scored.scores.values())
        if mode == "logprobs":  # llama-server returns top_logprobs: real, distinct log-probabilities
            assert all(-30 < s < 0 for s in scored.scores.values()) and len(set(scored.scores.values())) == 2
    finally:
        await backend.aclose()


async def test_a_prompt_over_the_context_is_an_error_with_its_own_code(llama_server: LlamaServer) -> None:
    backend = await started(llama_server.base_url)
    try:
        long = (await backend.generate(GenRequest(chat("word " * 3000), max_new_tokens=2))).result
        assert long.error is not None and "context" in long.error
        assert long.error_code == ErrorCode.CONTEXT_TOO_LONG
        scored = (await backend.generate(ScoreRequest(chat("word " * 3000), LABELS))).result
        assert scored.error_code == ErrorCode.CONTEXT_TOO_LONG and scored.label == ""
        assert backend.alive  # the server answered: nothing about it is away
    finally:
        await backend.aclose()


async def test_a_model_the_server_does_not_list_fails_start_naming_it(llama_server: LlamaServer) -> None:
    backend = open_backend(settings(llama_server.base_url, model="no-such-model"), max_queue=4)
    with pytest.raises(ServerRefused, match=r"does not serve model 'no-such-model'.*smollm2"):
        await backend.start()
    await backend.aclose()


def test_a_refused_api_key_fails_start_naming_the_server(tmp_path: Path) -> None:
    async def start_with(key: str | None, base_url: str) -> None:
        backend = open_backend(settings(base_url, api_key=key), max_queue=4)
        try:
            await backend.start()
            assert (await backend.generate(GenRequest(chat("Hi"), max_new_tokens=1))).result.error is None
        finally:
            await backend.aclose()

    with llama_service(tmp_path, extra="--api-key right-key") as server:
        with pytest.raises(ServerRefused, match=rf"{server.base_url} refused the API key.*401") as refused:
            asyncio.run(start_with("wrong-key", server.base_url))
        assert "wrong-key" not in str(refused.value)
        asyncio.run(start_with("right-key", server.base_url))


async def test_429_and_503_back_off_honour_retry_after_and_the_limit_falls_then_recovers(
        proxy: FaultProxy) -> None:
    recorder = Recorder()
    backend = await started(proxy.base_url, recorder, max_concurrency=4, retry_base_s=0.05, retry_max_s=0.2,
                            latency_tolerance=1000)
    try:
        proxy.answer(429, times=2, retry_after="1")
        faulted_at = time.monotonic()
        await answered_once(backend, 4)
        first_retry = min(t for t in proxy.chat_times if t > faulted_at + 0.5)  # the 429s came at once
        assert first_retry - faulted_at >= 1.0, "Retry-After: 1 was not honoured"
        proxy.answer(503, times=2)
        await answered_once(backend, 4)
        await answered_once(backend, 8)  # successes raise the limit again
    finally:
        await backend.aclose()
    assert proxy.faulted == {"429": 2, "503": 2}
    assert recorder.retries.count("overloaded") == 4
    assert recorder.limits[0] == 4 and min(recorder.limits) < 4 and recorder.limits[-1] == 4, recorder.limits
    assert recorder.circuit == ["closed"]  # a busy server is not an absent one


async def test_a_stalled_call_times_out_and_is_retried(proxy: FaultProxy) -> None:
    recorder = Recorder()
    backend = await started(proxy.base_url, recorder, read_timeout_s=1.0, retry_base_s=0.05, retry_max_s=0.2)
    try:
        proxy.stall(times=1)
        await answered_once(backend, 1)
    finally:
        await backend.aclose()
    assert proxy.faulted == {"stall": 1} and proxy.seen["/v1/chat/completions"] == 2
    assert recorder.retries == ["timeout"]


async def test_the_circuit_opens_while_the_server_is_away_and_closes_when_it_returns(proxy: FaultProxy) -> None:
    recorder = Recorder()
    backend = await started(proxy.base_url, recorder, circuit_failures=3, circuit_open_s=0.3, retry_base_s=0.05,
                            retry_max_s=0.5, connect_timeout_s=1.0)
    try:
        await proxy.away()
        pending = [backend.submit(short(i)) for i in range(6)]
        for _ in range(100):
            if not backend.alive:
                break
            await asyncio.sleep(0.05)
        assert not backend.alive and backend.free_slots() == 0, "the circuit did not open"
        await asyncio.sleep(1.5)  # probes fail while it is away; nothing is failed meanwhile
        assert not any(f.done() for f in pending) and backend.free_slots() == 0
        await proxy.back()
        results = await asyncio.wait_for(asyncio.gather(*pending), 60)
        assert [r.result.error for r in results] == [None] * 6
        assert backend.alive and backend.free_slots() == 16
    finally:
        await backend.aclose()
    assert recorder.circuit[0] == "closed" and "open" in recorder.circuit and recorder.circuit[-1] == "closed"
    assert set(recorder.retries) <= {"connection", "timeout"} and recorder.retries
