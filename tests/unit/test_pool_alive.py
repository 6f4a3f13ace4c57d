"""Pools on a tiny random Llama report whether they can serve (`alive`, for readiness), and the
continuous pool's engine thread survives a request the engine raises on."""

from __future__ import annotations

import pytest

from streamer.batching.batcher import BatchRules
from streamer.config import BatchingSettings, EngineSettings
from streamer.engine.build import build_pool
from streamer.engine.continuous import ContinuousPool
from streamer.engine.engine import Engine, Finished, TokenRequest
from streamer.engine.pool import StaticPool
from streamer.engine.requests import GenRequest
from streamer.engine.worker import LLMWorker
from streamer.models.loader import load_model
from tests.tiny import save_tiny_llama


def ask(text: str) -> GenRequest:
    return GenRequest(({"role": "user", "content": text},), max_new_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> LLMWorker:
    return LLMWorker(load_model(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-alive")), device="cpu"))


def continuous(worker: LLMWorker) -> ContinuousPool:
    pool = build_pool(worker, BatchingSettings(), EngineSettings(kv_cache_gib=0.01, block_size=4))
    assert isinstance(pool, ContinuousPool) and isinstance(pool.engine, Engine)
    return pool


async def test_a_request_the_engine_raises_on_fails_alone_and_the_engine_thread_serves_on(worker: LLMWorker) -> None:
    pool = continuous(worker)
    engine = pool.engine
    assert isinstance(engine, Engine)
    bad = tuple(worker.prompt_ids([ask("bad").messages])[0])
    add = engine.add

    def raises_on_bad(key: object, request: TokenRequest, deadline_s: float) -> Finished | None:
        if request.prompt == bad:
            raise IndexError("an engine bug this input triggers")
        return add(key, request, deadline_s)

    engine.add = raises_on_bad  # type: ignore[method-assign,assignment]
    async with pool:
        failed = (await pool.generate(ask("bad"))).result
        served = (await pool.generate(ask("good"))).result
        assert pool.alive
    assert failed.error == "IndexError: an engine bug this input triggers"
    assert served.error is None


async def test_the_continuous_pool_is_not_alive_once_its_engine_thread_failed(worker: LLMWorker) -> None:
    pool = continuous(worker)

    def broken_step() -> list[Finished]:
        raise AssertionError("a scheduler bug")

    pool.engine.step = broken_step  # type: ignore[method-assign]
    async with pool:
        assert pool.alive
        with pytest.raises(RuntimeError, match="engine thread failed"):
            await pool.generate(ask("anything"))
        assert not pool.alive


async def test_the_static_pool_is_alive_from_start_to_aclose(worker: LLMWorker) -> None:
    pool = StaticPool(worker, BatchRules(max_batch=4, max_wait_ms=5))
    assert not pool.alive
    async with pool:
        assert pool.alive
        assert (await pool.generate(ask("hi"))).result.error is None
    assert not pool.alive
