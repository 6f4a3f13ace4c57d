"""The pipeline on `engine.kind: openai` against a real third-party server (llama.cpp's llama-server serving
the same SmolLM2 GGUF), the real broker and the real redis-server: the slice's guarantees, a window
summary, and an outage of the server that loses nothing and dead-letters nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
import redis

from streamer.config import Settings
from streamer.engine.load import load_backend
from streamer.observe.metrics import Metrics
from streamer.pipeline.app import Pipeline, connect
from tests.integration.services import (
    LlamaServer,
    committed_offsets,
    consume_all,
    create_topic,
    end_offsets,
    llama_service,
    produce_lines,
    unique_name,
)
from tests.integration.test_pipeline import MALFORMED, question

pytestmark = pytest.mark.integration

VALID = 24
REVIEWS = 8
LABELS = ["positive", "negative"]
T0 = 1_700_000_000_000


def openai_settings(bootstrap: str, redis_url: str, tag: str, server: LlamaServer, routes: list[dict]) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}",
               "commit_interval_ms": 200},
        redis={"url": redis_url, "prefix": tag},
        limits={"max_chars": 500},
        batching={"max_batch": 16, "max_queue": 32},
        engine={"kind": "openai", "openai": {"base_url": server.base_url, "model": "smollm2"}},
        routes=routes,
    )


def pipeline_on(settings: Settings, bootstrap: str, redis_url: str) -> Pipeline:
    metrics = Metrics()
    backend = load_backend(settings.model, settings.batching, settings.engine, metrics.batch_done, observer=metrics)
    return connect(settings, bootstrap, redis_url, backend, metrics=metrics)


async def run_until(pipeline: Pipeline, condition, timeout_s: float) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(pipeline.run(stop))
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline and not running.done():
        await asyncio.sleep(0.1)
    stop.set()
    await running
    assert condition(), f"timed out: {pipeline.written} written"


def review(i: int) -> bytes:
    mood = "I love it, wonderful" if i % 2 else "I hate it, awful and broken"
    return orjson.dumps({"id": f"r-{i:03d}", "key": f"k-{i % 3}", "text": f"Review {i}: {mood}."})


def test_every_valid_event_is_answered_or_classified_once_and_every_bad_one_is_dead_lettered(
        kafka_bootstrap, redis_url, llama_server):
    tag = unique_name("oai")
    settings = openai_settings(kafka_bootstrap, redis_url, tag, llama_server, [
        {"name": "q", "input": f"in-{tag}", "output": f"out-{tag}"},
        {"name": "c", "input": f"rev-{tag}", "output": f"cls-{tag}", "task": "classify", "labels": LABELS},
    ])
    for topic in (f"in-{tag}", f"rev-{tag}"):  # both before the group joins: no rebalance (and replay) mid-test
        create_topic(kafka_bootstrap, topic)
    questions = [question(i) for i in range(VALID)] + [value for value, _ in MALFORMED]
    reviews = [review(i) for i in range(REVIEWS)]
    produce_lines(kafka_bootstrap, f"in-{tag}", questions)
    produce_lines(kafka_bootstrap, f"rev-{tag}", reviews)
    pipeline = pipeline_on(settings, kafka_bootstrap, redis_url)

    asyncio.run(run_until(pipeline, lambda: pipeline.written >= len(questions) + len(reviews), 300))

    answers = [orjson.loads(m.value) for m in consume_all(kafka_bootstrap, f"out-{tag}", VALID, timeout_s=60)]
    assert sorted(a["id"] for a in answers) == [f"q-{i:03d}" for i in range(VALID)]
    assert all(a["output"] and 0 < a["tokens_out"] <= 8 and a["model"] == "smollm2" for a in answers)
    labelled = [orjson.loads(m.value) for m in consume_all(kafka_bootstrap, f"cls-{tag}", REVIEWS, timeout_s=60)]
    assert sorted(a["id"] for a in labelled) == [f"r-{i:03d}" for i in range(REVIEWS)]
    assert {a["output"] for a in labelled} <= set(LABELS)
    letters = [orjson.loads(m.value) for m in consume_all(kafka_bootstrap, f"dlq-{tag}", len(MALFORMED), 60)]
    assert Counter(d["error"] for d in letters) == Counter(code for _, code in MALFORMED)
    counters = {k.decode(): int(v) for k, v in redis.Redis.from_url(redis_url).hgetall(f"{tag}:counters").items()}
    assert counters["answers"] == VALID + REVIEWS and counters["dead_letters"] == len(MALFORMED)
    for topic in (f"in-{tag}", f"rev-{tag}"):
        assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic) == end_offsets(kafka_bootstrap, topic)


def test_a_window_summary_route_summarises_each_closed_window_through_the_server(
        kafka_bootstrap, redis_url, llama_server):
    tag = unique_name("oaiwin")
    create_topic(kafka_bootstrap, f"in-{tag}", partitions=1)
    settings = openai_settings(kafka_bootstrap, redis_url, tag, llama_server, [
        {"name": "s", "input": f"in-{tag}", "task": "none",
         "window": {"kind": "tumbling", "size_ms": 10_000, "idle_timeout_ms": 1000, "task": "summarize",
                    "output": f"win-{tag}"}},
    ])
    events = [orjson.dumps({"id": f"e{i}", "key": "shop", "ts": T0 + i * 2000,
                            "text": f"Customer {i} says the delivery was late again."}) for i in range(10)]
    produce_lines(kafka_bootstrap, f"in-{tag}", events)
    pipeline = pipeline_on(settings, kafka_bootstrap, redis_url)

    asyncio.run(run_until(pipeline, lambda: pipeline.windows_written >= 2, 180))

    results = [orjson.loads(r.value) for r in consume_all(kafka_bootstrap, f"win-{tag}", 2, timeout_s=30)]
    assert sorted(r["count"] for r in results) == [5, 5]
    assert all(r["final"] and r["summary"] and r["summary"].strip() for r in results)


def test_the_server_killed_for_20_s_mid_stream_loses_nothing_dead_letters_nothing_and_the_lag_drains(
        kafka_bootstrap, redis_url, tmp_path: Path):
    tag = unique_name("oaiout")
    with llama_service(tmp_path / "llama") as server:
        settings = openai_settings(kafka_bootstrap, redis_url, tag, server, [
            {"name": "q", "input": f"in-{tag}", "output": f"out-{tag}"}])
        total = 48
        create_topic(kafka_bootstrap, f"in-{tag}")
        produce_lines(kafka_bootstrap, f"in-{tag}", [question(i) for i in range(total)])
        pipeline = pipeline_on(settings, kafka_bootstrap, redis_url)
        registry = pipeline.metrics.registry
        outage: dict[str, float] = {}

        def kill_then_restart() -> None:
            while pipeline.written < 8:
                time.sleep(0.05)
            outage["stopped_at"] = pipeline.written
            server.stop()
            time.sleep(20)
            outage["written_while_down"] = pipeline.written - outage["stopped_at"]
            outage["circuit_open"] = registry.get_sample_value(
                "streamer_remote_circuit", {"server": server.base_url, "state": "open"}) or 0
            outage["retries"] = sum(registry.get_sample_value(
                "streamer_remote_retries_total", {"server": server.base_url, "cause": cause}) or 0
                for cause in ("connection", "timeout", "server_error"))
            server.start()

        chaos = threading.Thread(target=kill_then_restart)
        chaos.start()
        asyncio.run(run_until(pipeline, lambda: pipeline.written >= total, 300))
        chaos.join()

    answers = [orjson.loads(m.value) for m in consume_all(kafka_bootstrap, f"out-{tag}", total, timeout_s=60)]
    assert sorted(a["id"] for a in answers) == [f"q-{i:03d}" for i in range(total)]  # none lost, none twice
    assert outage["stopped_at"] < total and outage["written_while_down"] < total - outage["stopped_at"]
    assert outage["circuit_open"] == 1 and outage["retries"] > 0  # waited out, admission stopped
    counters = {k.decode(): int(v) for k, v in redis.Redis.from_url(redis_url).hgetall(f"{tag}:counters").items()}
    assert counters.get("dead_letters", 0) == 0
    assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, f"in-{tag}") == end_offsets(
        kafka_bootstrap, f"in-{tag}")
