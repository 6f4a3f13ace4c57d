"""Event-time windows against the real broker and Redis: exact results, late events, idle partitions."""

from __future__ import annotations

import asyncio
import signal
import time

import orjson
import pytest
import redis
import yaml

from streamer.config import Settings
from streamer.engine.build import resident
from streamer.pipeline.app import Pipeline, connect
from tests.integration.services import (
    consume_all,
    counters,
    create_topic,
    end_offsets,
    produce_lines,
    start_service,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000  # aligned to 10 s; old enough that "processing time" closes everything when idle
SIZE_MS = 10_000


def event(i: str, key: str, offset_ms: int) -> bytes:
    return orjson.dumps({"id": i, "key": key, "text": f"event {i} of {key}", "ts": T0 + offset_ms})


def window_settings(bootstrap: str, redis_url: str, tag: str) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}"},
        redis={"url": redis_url, "prefix": tag},
        routes=[{"name": "counts", "input": f"in-{tag}", "task": "none",
                 "window": {"kind": "tumbling", "size_ms": SIZE_MS, "idle_timeout_ms": 2000, "task": "stats",
                            "output": f"win-{tag}"}}],
    )


async def run_until(pipeline: Pipeline, condition, timeout_s: float, produce_later=None) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(pipeline.run(stop))
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline and not running.done():
        if produce_later and produce_later[0]():
            await asyncio.to_thread(produce_later[1])
            produce_later = None
        await asyncio.sleep(0.05)
    stop.set()
    await running
    assert condition(), "timed out"


def test_tumbling_windows_give_exact_results_and_late_events_are_routed_not_counted(
    kafka_bootstrap, redis_url, worker
):
    tag = unique_name("win")
    settings = window_settings(kafka_bootstrap, redis_url, tag)
    create_topic(kafka_bootstrap, f"in-{tag}", partitions=3)
    # key a on partition 0, key b on partition 1; partition 2 stays idle and must not hold windows back.
    in_time = [event("a1", "a", 1000), event("a2", "a", 2000), event("a3", "a", 12_000), event("a4", "a", 25_000),
               event("b1", "b", 3000), event("b2", "b", 15_000), event("b3", "b", 26_000)]
    produce_lines(kafka_bootstrap, f"in-{tag}", in_time, partitions=[0, 0, 0, 0, 1, 1, 1])
    late = [event("late", "a", 500)]
    pipeline = connect(settings, kafka_bootstrap, redis_url, resident(worker, settings))

    def first_windows_closed() -> bool:
        return pipeline.windows_written >= 4

    asyncio.run(run_until(
        pipeline, lambda: pipeline.windows_written == 6 and pipeline.written == 1, 120,
        produce_later=(first_windows_closed,
                       lambda: produce_lines(kafka_bootstrap, f"in-{tag}", late, partitions=[0])),
    ))

    results = [orjson.loads(r.value) for r in consume_all(kafka_bootstrap, f"win-{tag}", 6, timeout_s=30)]
    got = sorted((r["key"], r["window"]["start"] - T0, r["count"], r["first_ts"] - T0, r["last_ts"] - T0)
                 for r in results)
    assert got == [("a", 0, 2, 1000, 2000), ("a", 10_000, 1, 12_000, 12_000), ("a", 20_000, 1, 25_000, 25_000),
                   ("b", 0, 1, 3000, 3000), ("b", 10_000, 1, 15_000, 15_000), ("b", 20_000, 1, 26_000, 26_000)]
    assert all(r["final"] and r["window"]["end"] - r["window"]["start"] == SIZE_MS for r in results)
    assert {r["stats"]["chars_min"] for r in results} == {len("event a1 of a")}
    letters = [orjson.loads(r.value) for r in consume_all(kafka_bootstrap, f"dlq-{tag}", 1, timeout_s=30)]
    assert [(d["error"], d["id"]) for d in letters] == [("late", "late")]

    client = redis.Redis.from_url(redis_url)
    assert client.hget(f"{tag}:late", "counts") == b"1"
    assert client.hget(f"{tag}:counters", "windows") == b"6"
    ids = client.zrange(f"{tag}:windows:counts:a", 0, -1)
    assert [orjson.loads(client.hget(f"{tag}:window:{i.decode()}", "result"))["first_ts"] - T0 for i in ids] == [
        1000, 12_000, 25_000]
    latest = orjson.loads(client.hget(f"{tag}:windows:latest:counts", "b"))
    assert latest["window"]["start"] - T0 == 20_000


def test_sigkill_while_windows_are_open_then_restart_emits_each_final_result_once(
    kafka_bootstrap, redis_url, tmp_path
):
    tag = unique_name("wincrash")
    create_topic(kafka_bootstrap, f"in-{tag}", partitions=3)
    config = tmp_path / "streamer.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}",
                  "commit_interval_ms": 100},
        "redis": {"url": redis_url, "prefix": tag},
        "routes": [{"name": "w", "input": f"in-{tag}", "task": "none",
                    "window": {"kind": "tumbling", "size_ms": SIZE_MS, "idle_timeout_ms": 8000,
                               "output": f"win-{tag}"}}],
    }))
    keys, parts = ["a", "b", "c"], [0, 1, 2]
    # Per partition: three events in [0, 10 s), then one at 12 s that closes that first window
    # (every partition reaches 12 s) and leaves the [10 s, 20 s) windows open.
    values, partitions = [], []
    for key, part in zip(keys, parts, strict=True):
        for n, at_ms in enumerate([1000, 4000, 7000, 12_000]):
            values.append(event(f"{key}{n}", key, at_ms))
            partitions.append(part)
    produce_lines(kafka_bootstrap, f"in-{tag}", values, partitions=partitions)
    client = redis.Redis.from_url(redis_url)
    log = tmp_path / "service.log"

    first = start_service(config, log)
    wait_for(lambda: counters(client, tag).get("windows", 0) >= 3, 120, "the first windows", log)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert counters(client, tag)["windows"] == 3, "the kill came too late: the open windows had closed"

    second = start_service(config, log)
    wait_for(lambda: counters(client, tag).get("windows", 0) >= 6, 120, "the open windows to close", log)
    time.sleep(2)  # anything emitted twice would show up by now
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 0, log.read_text()[-3000:]

    records = sum(end_offsets(kafka_bootstrap, f"win-{tag}").values())
    results = [orjson.loads(r.value) for r in consume_all(kafka_bootstrap, f"win-{tag}", records, timeout_s=30)]
    got = sorted((r["key"], r["window"]["start"] - T0, r["count"]) for r in results)
    assert got == [("a", 0, 3), ("a", 10_000, 1), ("b", 0, 3), ("b", 10_000, 1), ("c", 0, 3), ("c", 10_000, 1)]
    assert counters(client, tag)["windows"] == 6


def test_a_classify_route_counts_labels_per_window_and_a_summarize_route_summarises_each_window(
    kafka_bootstrap, redis_url, worker
):
    tag = unique_name("tasks")
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}"},
        redis={"url": redis_url, "prefix": tag},
        routes=[
            {"name": "reviews", "input": f"reviews-{tag}", "task": "classify",
             "labels": ["positive", "negative", "neutral"], "output": f"labels-{tag}",
             "window": {"kind": "tumbling", "size_ms": SIZE_MS, "idle_timeout_ms": 1000, "output": f"rw-{tag}"}},
            {"name": "chat", "input": f"chat-{tag}", "task": "none",
             "window": {"kind": "session", "gap_ms": 5000, "idle_timeout_ms": 1000, "task": "summarize",
                        "summary_tokens": 40, "output": f"cw-{tag}"}},
        ],
    )
    reviews = [("I love it, works perfectly and arrived early.", 1000), ("Terrible. Broke after one day.", 2000),
               ("Absolutely fantastic quality, highly recommend!", 3000), ("Awful, a complete waste of money.", 4000)]
    # Keyed by the window key, as windowed input should be: per-key windows are per partition.
    produce_lines(kafka_bootstrap, f"reviews-{tag}",
                  [orjson.dumps({"id": f"r{i}", "key": "shop", "text": t, "ts": T0 + at})
                   for i, (t, at) in enumerate(reviews)], keys=[b"shop"] * len(reviews))
    chat = ["The train to Paris is delayed by an hour.", "Passengers are waiting on platform 4.",
            "The delay is caused by a signal failure."]
    produce_lines(kafka_bootstrap, f"chat-{tag}",
                  [orjson.dumps({"id": f"c{i}", "key": "station", "text": t, "ts": T0 + 1000 * i})
                   for i, t in enumerate(chat)], keys=[b"station"] * len(chat))
    pipeline = connect(settings, kafka_bootstrap, redis_url, resident(worker, settings))

    asyncio.run(run_until(pipeline, lambda: pipeline.windows_written == 2 and pipeline.written == 4, 300))

    [review_window] = [orjson.loads(r.value) for r in consume_all(kafka_bootstrap, f"rw-{tag}", 1, timeout_s=30)]
    assert review_window["count"] == 4
    assert sum(review_window["labels"].values()) == 4
    assert review_window["labels"].get("positive", 0) >= 1 and review_window["labels"].get("negative", 0) >= 1
    [chat_window] = [orjson.loads(r.value) for r in consume_all(kafka_bootstrap, f"cw-{tag}", 1, timeout_s=30)]
    assert chat_window["window"]["kind"] == "session"
    assert (chat_window["count"], chat_window["window"]["end"] - T0) == (3, 2000 + 5000)
    assert chat_window["summary"].strip() and chat_window["model"] == worker.name
    print("summary:", chat_window["summary"])


def test_update_mode_emits_provisional_results_and_a_full_window_folds_its_texts(kafka_bootstrap, redis_url, worker):
    tag = unique_name("update")
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}"},
        redis={"url": redis_url, "prefix": tag},
        routes=[{"name": "notes", "input": f"in-{tag}", "task": "none",
                 "window": {"kind": "tumbling", "size_ms": SIZE_MS, "idle_timeout_ms": 1500, "task": "summarize",
                            "summary_tokens": 24, "max_events": 3, "emit": "update", "update_every_events": 2,
                            "output": f"win-{tag}"}}],
    )
    notes = ["The lift on floor 2 is broken.", "Technicians were called at nine.", "They replaced a cable.",
             "The lift works again.", "Floor 2 is open."]
    produce_lines(kafka_bootstrap, f"in-{tag}", [orjson.dumps({"id": f"n{i}", "key": "lift", "text": t,
                                                               "ts": T0 + 1000 * i}) for i, t in enumerate(notes)],
                  keys=[b"lift"] * len(notes))
    pipeline = connect(settings, kafka_bootstrap, redis_url, resident(worker, settings))

    asyncio.run(run_until(pipeline, lambda: pipeline.windows_written == 1, 300))

    records = sum(end_offsets(kafka_bootstrap, f"win-{tag}").values())
    results = [orjson.loads(r.value) for r in consume_all(kafka_bootstrap, f"win-{tag}", records, timeout_s=30)]
    provisional = [r for r in results if not r["final"]]
    [final] = [r for r in results if r["final"]]
    assert provisional and all(r["count"] < 5 and r["summary"] is None for r in provisional)
    assert len({r["id"] for r in results}) == 1  # provisional and final results share the window id
    assert final["count"] == 5 and final["summary"].strip()
    stored = redis.Redis.from_url(redis_url).hget(f"{tag}:window:{final['id']}", "final")
    assert stored == b"1"
