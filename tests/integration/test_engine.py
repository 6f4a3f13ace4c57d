"""The continuous-batching engine on the real SmolLM2: for greedy decoding its answers equal one-by-one
`generate` token for token, for 32 varied prompts, with and without a shared prefix taken from the cache."""

from __future__ import annotations

import asyncio

import pytest

from streamer.config import BatchingSettings, EngineSettings
from streamer.engine.build import build_pool
from streamer.engine.continuous import ContinuousPool
from streamer.engine.requests import GenRequest
from streamer.engine.worker import LLMWorker

pytestmark = pytest.mark.integration

SUBJECTS = ["Kafka", "the moon", "bread", "a haiku about rain", "TCP", "octopuses", "chess openings", "glaciers"]
ASKS = ["Explain {} in one sentence.", "Give two facts about {}.", "Why do people like {}?",
        "Write a very short poem about {}."]
SYSTEM = ("You are the support assistant of a stream-processing company. Answer briefly, politely and "
          "precisely; never invent product names; prefer plain words over jargon.")


def varied(system: str | None) -> list[GenRequest]:
    asks = [a.format(s) for s in SUBJECTS for a in ASKS]
    assert len(asks) == 32
    head = ({"role": "system", "content": system},) if system else ()
    return [GenRequest((*head, {"role": "user", "content": ask}), max_new_tokens=12 + i % 4 * 6)
            for i, ask in enumerate(asks)]


async def answers(pool: ContinuousPool, requests: list[GenRequest]) -> list[str]:
    async with pool:
        done = await asyncio.gather(*(pool.generate(r) for r in requests))
    return [d.result.text for d in done]


@pytest.mark.parametrize("system", [None, SYSTEM], ids=["no-shared-prefix", "shared-system-prompt"])
async def test_greedy_answers_equal_one_by_one_generate(worker: LLMWorker, system: str | None) -> None:
    requests = varied(system)
    expected = [worker.generate([r])[0].text for r in requests]
    pool = build_pool(worker, BatchingSettings(max_queue=64), EngineSettings(kv_cache_gib=0.25))
    assert isinstance(pool, ContinuousPool)
    got = await answers(pool, requests)
    assert got == expected
    # Without a system prompt of ours the chat template still opens with a default one, so prompts share a
    # prefix either way; at least half of them (those admitted after the first step) take it from the cache.
    first, second = worker.prompt_ids([requests[0].messages, requests[1].messages])
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert pool.engine.scheduler.reused_tokens >= len(requests) // 2 * (shared // 16 * 16)
