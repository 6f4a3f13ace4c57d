"""The public Python API and the OpenAI-compatible server on the real default model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

pytestmark = pytest.mark.integration

from streamer import LLMPool  # noqa: E402
from streamer.config import BatchingSettings  # noqa: E402
from streamer.engine.worker import LLMWorker  # noqa: E402
from streamer.serve.openai import run_server, start_server  # noqa: E402

BATCHING = BatchingSettings(max_batch=8, max_wait_ms=50)


async def test_concurrent_generates_are_batched(worker: LLMWorker) -> None:
    sizes: list[int] = []
    async with LLMPool.resident(worker, BATCHING, on_batch=lambda size, _: sizes.append(size)) as llm:
        prompts = [f"Name a colour, number {i}." for i in range(8)]
        done = await asyncio.gather(*(llm.generate(p, max_new_tokens=8) for p in prompts))
    assert max(sizes) > 1 and max(c.batch_size for c in done) > 1
    for c in done:
        assert c.text and c.model == worker.name and 0 < c.tokens_out <= 8 and c.tokens_in > 0
        assert c.latency_ms >= c.queued_ms >= 0 and not c.deadline_missed


async def test_deadline_is_reported_not_enforced(worker: LLMWorker) -> None:
    async with LLMPool.resident(worker, BATCHING) as llm:
        c = await llm.generate([{"role": "user", "content": "Hi"}], max_new_tokens=4, deadline_ms=0.001)
    assert c.deadline_missed and c.tokens_out > 0


async def test_classify_and_summarize(worker: LLMWorker) -> None:
    async with LLMPool.resident(worker, BATCHING) as llm:
        verdict, summary = await asyncio.gather(
            llm.classify("I absolutely love this product, it is wonderful and works perfectly!",
                         ["positive", "negative", "neutral"]),
            llm.summarize(["The build failed at 9am.", "A fix was pushed at 10am.", "The build is green again."],
                          max_new_tokens=40),
        )
    assert verdict.label == "positive" and set(verdict.scores) == {"positive", "negative", "neutral"}
    assert summary.text.strip() and summary.tokens_out <= 40


@pytest.fixture
async def base_url(worker: LLMWorker) -> AsyncIterator[str]:
    async with LLMPool.resident(worker, BATCHING) as llm:
        runner = await start_server(llm, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        finally:
            await runner.cleanup()


async def test_openai_client(base_url: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x")
    try:
        models = await client.models.list()
        model = models.data[0].id
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        whole = await client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
        text = whole.choices[0].message.content
        assert text and whole.usage is not None and 0 < whole.usage.completion_tokens <= 16

        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=16, temperature=0, stream=True
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert "".join(pieces) == text
        assert sum(1 for piece in pieces if piece) > 1, "text arrives token by token, not in one piece at the end"

        stop = text.split()[1]  # a word from inside the answer
        cut = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=16, temperature=0, stream=True, stop=[stop],
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in cut]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[: text.index(stop)]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

        prompts = ["Say hello.", "Name a colour."]
        both = await client.completions.create(model=model, prompt=prompts, max_tokens=8, temperature=0, stream=True)
        texts = ["", ""]
        async for chunk in both:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
        singles = [await client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0) for p in prompts]
        assert texts == [s.choices[0].text for s in singles]

        legacy = await client.completions.create(model=model, prompt="Say hello.", max_tokens=8, temperature=0)
        assert legacy.choices[0].text and legacy.usage is not None and legacy.usage.completion_tokens <= 8

        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model=model, messages=messages, n=2)
    finally:
        await client.close()


async def test_run_server_owns_the_pool_until_stopped(worker: LLMWorker) -> None:
    llm, stop = LLMPool.resident(worker, BATCHING), asyncio.Event()
    server = asyncio.create_task(run_server(llm, "127.0.0.1", 0, stop=stop))
    await asyncio.sleep(0.2)
    assert (await llm.generate("Hi", max_new_tokens=2)).tokens_out > 0  # started by run_server
    stop.set()
    await asyncio.wait_for(server, 10)
