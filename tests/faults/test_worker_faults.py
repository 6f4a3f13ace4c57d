"""The model worker raising on some batches, and a worker process dying, in a real `streamer run`.

Two engine worker processes on CPU drive a tiny random Llama (tests/tiny.py) against the session's
broker and Redis. tests/faults/faulty_engine.py, the service's entry point here, makes the children's
model steps fail: every step holding a poisoned event (one in 50 carries a character the tokenizer
does not know), and every 5th step of two or more sequences once (transient). Mid-stream one worker
process, stalled inside a step so that it surely holds requests, is SIGKILLed. Promised: a failed
step's sequences are retried one at a time, so the transient failures cost nothing; the dead child's
requests start over on the other, and a new child replaces it; only the poisoned events, which fail
even alone, are dead-lettered, as `model_error`; every other event is answered once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
import redis
import yaml
from confluent_kafka import Producer

from tests.faults.scenario import STARTED, read_topic, stop
from tests.integration.services import committed_offsets, counters, create_topic, end_offsets, unique_name
from tests.tiny import save_tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.integration

EVENTS = 2000
POISON_EVERY = 50
FAULTS = Path(__file__).with_name("faulty_engine.py")


def event(i: int) -> bytes:
    text = f"poison # {i}" if poisoned(i) else f"event {i} asks: why?"
    return orjson.dumps({"id": f"e-{i}", "key": f"k{i % 8}", "text": text})


def poisoned(i: int) -> bool:
    return i % POISON_EVERY == POISON_EVERY - 1


def config(tmp: Path, bootstrap: str, redis_url: str, tag: str) -> Path:
    path = tmp / "service.yaml"
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}"},
        "redis": {"url": redis_url, "prefix": tag},
        "model": {"path": str(save_tiny_llama(tmp / "tiny")), "device": "cpu", "dtype": "float32"},
        "engine": {"kind": "continuous", "workers": 2, "kv_cache_gib": 0.01},
        "routes": [{"name": "ask", "input": f"in-{tag}", "output": f"out-{tag}", "max_new_tokens": 4}],
    }))
    return path


def produce_events(bootstrap: str, topic: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for i in range(EVENTS):
        producer.produce(topic, event(i), key=f"k{i % 8}".encode())
        producer.poll(0)
    assert producer.flush(60) == 0


def wait(condition, timeout_s: float, what: str, log: Path) -> float:
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout_s, f"timed out waiting for {what}; log:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    return time.monotonic() - began


def test_failed_batches_run_again_alone_a_dead_worker_process_costs_nothing_only_poison_is_dead_lettered(
        kafka_bootstrap, redis_url, tmp_path):
    tag = unique_name("wfault")
    source, answers, letters = f"in-{tag}", f"out-{tag}", f"dlq-{tag}"
    create_topic(kafka_bootstrap, source, partitions=3)
    produce_events(kafka_bootstrap, source)
    log = tmp_path / "service.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STREAMER_TEST_POISON_ID": str(tiny_tokenizer().unk_token_id),
           "STREAMER_TEST_FAIL_EVERY": "5", "STREAMER_TEST_STALL": str(tmp_path / "stall")}
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, str(FAULTS), "run", "--config",
                                    str(config(tmp_path, kafka_bootstrap, redis_url, tag))],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    STARTED.append(process)
    state = redis.Redis.from_url(redis_url)
    began = time.monotonic()
    try:
        wait(lambda: counters(state, tag).get("answers", 0) >= EVENTS // 4, 120, "a quarter of the answers", log)
        pids = re.search(r"engine worker processes started: pids \[(\d+), (\d+)\]", log.read_text())
        assert pids is not None
        (tmp_path / "stall").touch()  # the next child to step stalls there, holding its requests
        stalled = tmp_path / "stall.pid"
        wait(lambda: stalled.exists() and stalled.read_text() != "", 60, "a child stalled in a step", log)
        assert stalled.read_text() in pids.groups()
        os.kill(int(stalled.read_text()), signal.SIGKILL)
        killed_at = time.monotonic()
        ends = end_offsets(kafka_bootstrap, source)
        wait(lambda: committed_offsets(kafka_bootstrap, f"g-{tag}", source) == ends, 120, "offsets at the end", log)
        recovery_s = time.monotonic() - killed_at
        assert stop(process) == 0
        totals = counters(state, tag)
    finally:
        state.close()

    answered = [orjson.loads(v) for v in read_topic(kafka_bootstrap, answers, committed=False)]
    dead = [orjson.loads(v) for v in read_topic(kafka_bootstrap, letters, committed=False)]
    valid = {f"e-{i}" for i in range(EVENTS) if not poisoned(i)}
    poison = {f"e-{i}" for i in range(EVENTS) if poisoned(i)}
    by_id = Counter(a["id"] for a in answered)
    duplicates = sum(by_id.values()) - len(by_id)
    assert set(by_id) == valid, f"lost {len(valid - set(by_id))}, answered poison {len(set(by_id) & poison)}"
    assert duplicates == 0, f"{duplicates} answers repeated"  # no replay: the service itself never died
    assert Counter(d["id"] for d in dead) == Counter(poison)
    assert {d["error"] for d in dead} == {"model_error"}
    assert all("poisoned input" in d["detail"] for d in dead)
    assert totals["events"] == EVENTS and totals["answers"] == len(valid)
    assert totals["dead_letters"] == totals["dead_letters:model_error"] == len(poison)

    text = log.read_text()
    died = re.search(r"engine worker pid \d+ died \(exit code -9\); retrying its ([1-9]\d*) requests", text)
    assert died is not None
    restarted = re.findall(r"engine worker \d restarted: pid (\d+)", text)
    assert len(restarted) == 1 and restarted[0] not in pids.groups()
    transient = text.count("injected: transient batch failure")
    assert transient >= 5  # each cost nothing: retried one at a time
    print(f"\nRELIABILITY worker faults: sent={EVENTS} answered={len(by_id)} dead_letters={len(dead)} "
          f"duplicates={duplicates} losses={len(valid - set(by_id))} transient_failures={transient} "
          f"redone={died.group(1)} restarted={len(restarted)} recovery_s={recovery_s:.1f} "
          f"total_s={time.monotonic() - began:.1f}")
