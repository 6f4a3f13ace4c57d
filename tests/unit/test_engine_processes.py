"""Engine worker processes on a tiny random Llama (CPU): two children answer like one in-process engine
and share the work, a SIGKILLed child costs no request and is restarted, a request in flight on two
dying children fails alone, requests wait while none is alive, none is left behind after aclose; a
model split by an explicit device_map gives the same greedy tokens as the unsplit one."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from streamer.config import BatchingSettings, EngineSettings, ModelSettings
from streamer.engine.build import EngineUnsupported, build_pool, worker_count
from streamer.engine.continuous import ContinuousPool
from streamer.engine.engine import Engine, EngineConfig, TokenRequest
from streamer.engine.load import load_worker
from streamer.engine.paged import Shape
from streamer.engine.processes import ProcessEngines, child_specs
from streamer.engine.requests import Generated, GenRequest, GenResult
from streamer.engine.worker import LLMWorker
from streamer.models.loader import load_model
from tests.tiny import save_tiny_llama

BATCHING = BatchingSettings()
TEXTS = ["Hi", "What is two plus two?", "Tell me a long story about a dragon.", "ok", "Why is the sky blue?",
         "Name three colours.", "Count to ten", "Say something nice"]


def engine_settings(workers: int) -> EngineSettings:
    return EngineSettings(workers=workers, kv_cache_gib=0.01, max_running=8, block_size=4)


def ask(text: str, max_new: int) -> GenRequest:
    return GenRequest(({"role": "user", "content": text},), max_new_tokens=max_new, ignore_eos=True)


REQUESTS = [ask(text, 4 + 3 * i) for i, text in enumerate(TEXTS)]
LONG = ask("Tell me a very long story", 300)  # long enough to be killed mid-run


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved to disk so that child processes load it by path, as they load a real model."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-processes"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def worker(tiny_dir: Path) -> LLMWorker:
    return LLMWorker(load_model(tiny_dir, device="cpu"))


async def answers(pool: ContinuousPool, requests: list[GenRequest]) -> list[GenResult]:
    done = await asyncio.gather(*(pool.generate(r) for r in requests))
    return [g.result for g in done]  # type: ignore[misc]


@pytest.fixture(scope="module")
def expected(worker: LLMWorker) -> list[GenResult]:
    """The in-process engine's answers (today's single-engine behaviour)."""

    async def run() -> list[GenResult]:
        async with build_pool(worker, BATCHING, engine_settings(1)) as pool:
            assert isinstance(pool, ContinuousPool) and isinstance(pool.engine, Engine)
            return await answers(pool, [*REQUESTS, LONG])

    return asyncio.run(run())


def assert_gone(pids: list[int | None]) -> None:
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def processes(worker: LLMWorker, workers: int = 2) -> ContinuousPool:
    pool = build_pool(worker, BATCHING, engine_settings(workers))
    assert isinstance(pool, ContinuousPool) and isinstance(pool.engine, ProcessEngines)
    return pool


def test_auto_is_one_in_process_engine_on_cpu_and_a_number_is_that_many_processes(worker: LLMWorker) -> None:
    assert worker_count(EngineSettings(), worker.device, split=False) == 1
    assert worker_count(EngineSettings(workers=2), worker.device, split=False) == 2
    with pytest.raises(ValueError):
        EngineSettings(workers=0)


async def test_two_worker_processes_answer_like_one_in_process_engine_and_share_the_work(
        worker: LLMWorker, expected: list[GenResult]) -> None:
    pool = processes(worker)
    engines = pool.engine
    assert isinstance(engines, ProcessEngines)
    async with pool:
        got = await answers(pool, REQUESTS)
        used, blocks, _ = pool.kv_usage()  # the children's caches, as they last reported
    assert got == expected[: len(REQUESTS)] and all(r.error is None for r in got)
    assert blocks > 0 and 0 <= used <= blocks
    assert sum(engines.routed) == len(REQUESTS) and min(engines.routed) >= 2  # fewest outstanding tokens first
    assert_gone(engines.pids)


async def test_a_parent_whose_engines_run_in_processes_holds_no_copy_of_the_weights(
        tiny_dir: Path, expected: list[GenResult]) -> None:
    settings = engine_settings(2)
    parent = load_worker(ModelSettings(path=tiny_dir, device="cpu"), settings)
    assert {p.device.type for p in parent.model.parameters()} == {"meta"}
    async with build_pool(parent, BATCHING, settings) as pool:
        assert await answers(pool, REQUESTS) == expected[: len(REQUESTS)]


def test_a_parent_with_one_in_process_engine_loads_the_weights(tiny_dir: Path) -> None:
    parent = load_worker(ModelSettings(path=tiny_dir, device="cpu"), engine_settings(1))
    assert {p.device.type for p in parent.model.parameters()} == {"cpu"}


async def test_one_engine_of_its_own_runs_in_one_child_holding_the_weights_and_answers_alike(
        tiny_dir: Path, expected: list[GenResult]) -> None:
    """`own_process`: the one engine's steps run on a process's first thread (on CPU ~1.3x faster, BENCHMARKS)."""
    settings = EngineSettings(workers=1, own_process=True, kv_cache_gib=0.01, max_running=8, block_size=4)
    parent = load_worker(ModelSettings(path=tiny_dir, device="cpu"), settings)
    assert {p.device.type for p in parent.model.parameters()} == {"meta"}
    pool = build_pool(parent, BATCHING, settings)
    engines = pool.engine
    assert isinstance(engines, ProcessEngines) and len(engines.pids) == 1
    async with pool:
        assert await answers(pool, [*REQUESTS, LONG]) == expected
    assert_gone(engines.pids)


def test_a_model_split_across_devices_cannot_have_an_engine_process_of_its_own(worker: LLMWorker) -> None:
    with pytest.raises(EngineUnsupported, match="own_process need a model on one device"):
        worker_count(EngineSettings(own_process=True), worker.device, split=True)


async def test_a_killed_worker_process_costs_no_request_and_no_token_twice(
        worker: LLMWorker, expected: list[GenResult], caplog: pytest.LogCaptureFixture) -> None:
    pool = processes(worker)
    engines = pool.engine
    assert isinstance(engines, ProcessEngines)
    caplog.set_level(logging.ERROR, logger="streamer.engine.processes")
    async with pool:
        stream = pool.stream(LONG)
        items: list[str | Generated] = [await anext(stream)]  # the first request goes to the first child
        others = asyncio.gather(*(pool.generate(r) for r in REQUESTS))
        os.kill(engines.pids[0], signal.SIGKILL)  # type: ignore[arg-type]
        items += [item async for item in stream]
        got = [g.result for g in await others]
    final = items[-1]
    assert isinstance(final, Generated) and final.result == expected[-1]
    assert "".join(items[:-1]) == expected[-1].text  # type: ignore[arg-type]  # every piece once, in order
    assert got == expected[: len(REQUESTS)]
    assert any(re.search(r"died .* retrying its [1-9]", r.getMessage()) for r in caplog.records)
    assert_gone(engines.pids)


async def until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.05)


def one_process(worker: LLMWorker) -> ContinuousPool:
    engines = ProcessEngines(child_specs(worker, engine_settings(1), 1))
    return ContinuousPool(engines, worker, BATCHING.max_queue, 60_000, on_close=engines.close)


async def test_a_killed_worker_process_is_restarted_and_the_new_one_serves(
        worker: LLMWorker, expected: list[GenResult]) -> None:
    pool = processes(worker)
    engines = pool.engine
    assert isinstance(engines, ProcessEngines)
    async with pool:
        first, second = engines.pids
        os.kill(first, signal.SIGKILL)  # type: ignore[arg-type]
        await until(lambda: engines.restarts == 1)  # noticed while idle
        os.kill(second, signal.SIGKILL)  # type: ignore[arg-type]
        assert await answers(pool, REQUESTS) == expected[: len(REQUESTS)]
        assert engines.alive
    assert engines.pids[0] != first
    assert_gone(engines.pids)


async def test_a_request_in_flight_on_two_dying_worker_processes_fails_and_one_in_flight_on_one_is_served(
        worker: LLMWorker, expected: list[GenResult], caplog: pytest.LogCaptureFixture) -> None:
    pool = one_process(worker)
    engines = pool.engine
    assert isinstance(engines, ProcessEngines)
    caplog.set_level(logging.ERROR, logger="streamer.engine.processes")
    async with pool:
        stream = pool.stream(LONG)
        items: list[str | Generated] = [await anext(stream)]  # it runs on the only worker process
        first = engines.pids[0]
        os.kill(first, signal.SIGKILL)  # type: ignore[arg-type]
        await until(lambda: not engines.alive)
        other = asyncio.ensure_future(pool.generate(LONG))  # waits for the restart, as the stream does
        await until(lambda: engines.pids[0] != first and engines.alive)  # restarted and loaded, both running there
        os.kill(engines.pids[0], signal.SIGKILL)  # type: ignore[arg-type]
        items += [item async for item in stream]
        served = await other
    final = items[-1]
    assert isinstance(final, Generated) and final.result.error is not None and "died" in final.result.error
    assert served.result == expected[-1]  # it died beside the stream's retry, the one blamed
    assert engines.restarts == 2
    deaths = [m.groups() for r in caplog.records
              if (m := re.search(r"died .* retrying its (\d) requests, failing (\d) .* in (\d) s", r.getMessage()))]
    assert deaths[:2] == [("1", "0", "1"), ("1", "1", "1")]
    assert_gone(engines.pids)


async def test_a_child_that_dies_before_it_loaded_blames_none_of_the_requests_sent_to_it(
        worker: LLMWorker, expected: list[GenResult]) -> None:
    """Found by review (fails on the code before the fix): a death before loading counted against the requests
    waiting for the child, so two such deaths failed requests that never ran."""
    pool = one_process(worker)
    engines = pool.engine
    assert isinstance(engines, ProcessEngines)
    async with pool:
        asked = asyncio.ensure_future(pool.generate(REQUESTS[1]))
        for _ in range(2):  # killed twice while loading, with the request sent to it
            pid = engines.pids[0]
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
            await until(lambda pid=pid: engines.pids[0] != pid)
        served = await asked
    assert served.result == expected[1]
    assert engines.restarts == 2
    assert_gone(engines.pids)


async def test_while_every_worker_process_is_dead_requests_wait_for_a_restart_and_readiness_is_false(
        worker: LLMWorker, expected: list[GenResult]) -> None:
    pool = processes(worker)
    engines = pool.engine
    assert isinstance(engines, ProcessEngines)
    async with pool:
        await until(lambda: engines.alive)
        assert pool.alive
        for pid in engines.pids:
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
        await until(lambda: not engines.alive)
        assert not pool.alive
        result = (await pool.generate(REQUESTS[0])).result
        assert engines.alive and pool.alive
    assert result == expected[0]
    assert engines.restarts == 2
    assert_gone(engines.pids)


async def test_aclose_right_after_start_leaves_no_process_behind(worker: LLMWorker) -> None:
    pool = processes(worker)
    async with pool:
        pass
    assert_gone(pool.engine.pids)  # type: ignore[union-attr]


def test_a_model_split_by_device_map_runs_the_same_greedy_tokens(tiny_dir: Path, worker: LLMWorker) -> None:
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                 "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    split = load_model(tiny_dir, device="cpu", device_map=placement)
    assert Shape.of(split.model).devices == (torch.device("cpu"),) * 2 and split.device == torch.device("cpu")
    config = EngineConfig(block_size=4, num_blocks=512)
    prompts = [tuple(ids) for ids in worker.prompt_ids([r.messages for r in REQUESTS])]
    assert run(Engine(split.model, config, frozenset()), prompts) == run(Engine(worker.model, config, frozenset()),
                                                                         prompts)


def run(engine: Engine, prompts: list[tuple[int, ...]]) -> dict[object, list[int]]:
    for i, prompt in enumerate(prompts):
        assert engine.add(i, TokenRequest(prompt, 12), 0.0) is None
    done: dict[object, list[int]] = {}
    while not engine.idle:
        done.update((f.key, f.tokens) for f in engine.step())
    return done
