"""Window results depend on the input, not on timing, on a real broker: the same 332 events on 3
partitions, read as a backlog at start, produced live in phases, and read by a `streamer run` killed
mid-stream and restarted, give exactly the windows and the late events the brute-force oracle of the
simulation (tests/sim/oracle.py) computes from the log alone.

Before (e3474c9), the watermark was read once per poll batch: the backlog gave 0 late events and
inflated windows where the live run gave the oracle's; and a restart forgot the watermark, so a
replay counted in windows events the first run had dead-lettered as late.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml
from confluent_kafka import KafkaException

from streamer.config import Settings, WindowSettings
from streamer.engine.build import resident
from streamer.pipeline.app import connect
from tests.integration.services import committed_offsets, consume_all, create_topic, produce_lines, unique_name
from tests.sim.oracle import Event, expect

pytestmark = pytest.mark.integration

T0 = (int(time.time() * 1000) - 3_600_000) // 1000 * 1000
PARTITIONS = 3
WINDOW = {"kind": "tumbling", "size_ms": 1000, "allowed_lateness_ms": 200, "idle_timeout_ms": 600_000}


def stream(n: int = 332, seed: int = 5) -> list[tuple[int, str, int]]:
    """(partition, key, ts): time moves forward per partition, one event in five comes from behind; the
    last event of each partition is far enough ahead to close every window before it."""
    rng = random.Random(seed)
    clock = [T0] * PARTITIONS
    events = []
    for i in range(n - PARTITIONS):
        p = rng.randrange(PARTITIONS)
        clock[p] += rng.randrange(0, 300)
        behind = rng.choice([0, 0, 0, 0, 400, 1500])
        events.append((p, f"k{p}-{i % 4}", clock[p] - behind))
    return events + [(p, f"k{p}-0", clock[p] + 5_000) for p in range(PARTITIONS)]


def message(i: int, key: str, ts: int) -> bytes:
    return orjson.dumps({"id": f"e{i}", "key": key, "text": f"event {i}", "ts": ts})


def expected(events: list[tuple[int, str, int]]) -> tuple[dict[str, int], set[tuple[int, int]]]:
    """(window id -> count, late (partition, offset)) as the oracle says: offsets follow production order."""
    offsets = [0] * PARTITIONS
    placed = []
    for i, (p, key, ts) in enumerate(events):
        placed.append(Event(p, offsets[p], key, ts, f"event {i}", None))
        offsets[p] += 1
    oracle = expect("w", WindowSettings(output="unused", **WINDOW), placed)  # type: ignore[arg-type]
    last = {p: offsets[p] - 1 for p in range(PARTITIONS)}  # the closers' own windows never close
    windows = {wid: len(members) for wid, members in oracle.windows.items()
               if not any(m.offset == last[m.partition] for m in members)}
    return windows, oracle.late


def settings(bootstrap: str, redis_url: str, tag: str, topic: str) -> dict:
    return {"kafka": {"bootstrap_servers": bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}",
                      "commit_interval_ms": 200},
            "redis": {"url": redis_url, "prefix": tag},
            "observe": {"http_port": None},
            "routes": [{"name": "w", "input": topic, "task": "none", "window": {**WINDOW, "output": f"win-{tag}"}}]}


def produce(bootstrap: str, topic: str, events: list[tuple[int, str, int]], start: int, stop: int) -> None:
    part = events[start:stop]
    produce_lines(bootstrap, topic, [message(start + i, k, ts) for i, (_, k, ts) in enumerate(part)],
                  partitions=[p for p, _, _ in part])


def everything(bootstrap: str, topic: str) -> list[dict]:
    """Every record of an output topic (read until it has been quiet a few seconds)."""
    return [orjson.loads(m.value) for m in consume_all(bootstrap, topic, 10**9, 8)]


def results(bootstrap: str, tag: str) -> tuple[dict[str, int], set[tuple[int, int]]]:
    """Window id -> count (a window written twice, at least once, must have one count) and late events."""
    counts: dict[str, set[int]] = {}
    for result in everything(bootstrap, f"win-{tag}"):
        counts.setdefault(result["id"], set()).add(result["count"])
    assert all(len(c) == 1 for c in counts.values()), "a window written twice with two counts"
    letters = everything(bootstrap, f"dlq-{tag}")
    return ({wid: c.pop() for wid, c in counts.items()},
            {(d["source"]["partition"], d["source"]["offset"]) for d in letters if d["error"] == "late"})


def run_in_process(bootstrap: str, redis_url: str, worker, tag: str, topic: str, windows: int,
                   phases: list[tuple[int, int]] | None, events: list[tuple[int, str, int]]) -> None:
    pipeline = connect(configured := Settings(**settings(bootstrap, redis_url, tag, topic)), bootstrap, redis_url,
                       resident(worker, configured))

    async def run() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(pipeline.run(stop))
        for start, end in phases or []:  # live: produced while the pipeline runs, a phase at a time
            await asyncio.to_thread(produce, bootstrap, topic, events, start, end)
            await asyncio.sleep(1.0)
        deadline = time.monotonic() + 120
        while pipeline.windows_written < windows and time.monotonic() < deadline and not running.done():
            await asyncio.sleep(0.1)
        stop.set()
        await running

    asyncio.run(run())


def caught_up(bootstrap: str, group: str, topic: str, offsets: int) -> bool:
    """Whether the group committed every event but the closers (whose own windows stay open)."""
    try:
        return sum(committed_offsets(bootstrap, group, topic).values()) >= offsets
    except KafkaException:  # no coordinator yet
        return False


@pytest.fixture(scope="module")
def log(kafka_bootstrap: str) -> tuple[str, list[tuple[int, str, int]]]:
    """The input topic, produced once: the backlog and the restart runs read it as it is."""
    topic = unique_name("replay-in")
    create_topic(kafka_bootstrap, topic, partitions=PARTITIONS)
    events = stream()
    produce(kafka_bootstrap, topic, events, 0, len(events))
    return topic, events


def test_a_backlog_gives_the_oracles_windows_and_late_events(kafka_bootstrap, redis_url, worker, log) -> None:
    topic, events = log
    windows, late = expected(events)
    tag = unique_name("backlog")
    run_in_process(kafka_bootstrap, redis_url, worker, tag, topic, len(windows), None, events)
    assert results(kafka_bootstrap, tag) == (windows, late)
    print(f"\n{len(events)} events: {len(windows)} windows, {len(late)} late, as the oracle says")


def test_a_live_stream_in_phases_gives_the_same(kafka_bootstrap, redis_url, worker) -> None:
    topic, events, tag = unique_name("live-in"), stream(), unique_name("live")
    create_topic(kafka_bootstrap, topic, partitions=PARTITIONS)
    windows, late = expected(events)
    phases = [(0, 80), (80, 200), (200, 290), (290, len(events))]
    run_in_process(kafka_bootstrap, redis_url, worker, tag, topic, len(windows), phases, events)
    assert results(kafka_bootstrap, tag) == (windows, late)


def test_a_kill_and_restart_mid_stream_gives_the_same(kafka_bootstrap, redis_url, tmp_path: Path) -> None:
    """`streamer run` SIGKILLed with windows open, the rest of the stream produced meanwhile, then a
    restart: at least once a window may be written twice (same id) but never with two counts, and no
    late event is counted, nor any counted event dead-lettered as late, by the replay."""
    topic, events, tag = unique_name("restart-in"), stream(), unique_name("restart")
    create_topic(kafka_bootstrap, topic, partitions=PARTITIONS)
    windows, late = expected(events)
    config = tmp_path / "streamer.yaml"
    config.write_text(yaml.safe_dump(settings(kafka_bootstrap, redis_url, tag, topic)))
    service_log = tmp_path / "service.log"
    out = service_log.open("ab")

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)

    produce(kafka_bootstrap, topic, events, 0, 170)
    first, second = start(), None
    try:
        deadline = time.monotonic() + 240
        while len(consume_all(kafka_bootstrap, f"win-{tag}", 10**9, 2)) < 20:
            assert time.monotonic() < deadline and first.poll() is None, service_log.read_text()[-3000:]
        first.kill()
        first.wait(30)
        produce(kafka_bootstrap, topic, events, 170, len(events))
        second = start()
        while not caught_up(kafka_bootstrap, f"g-{tag}", topic, len(events) - PARTITIONS):
            assert time.monotonic() < deadline + 180 and second.poll() is None, service_log.read_text()[-3000:]
            time.sleep(1)
        second.terminate()
        assert second.wait(60) == 0
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    assert results(kafka_bootstrap, tag) == (windows, late)
