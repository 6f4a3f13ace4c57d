"""What every fault scenario shares: the stream it sends, the service config, and the exactness check.

Two route shapes. `count`: route task `none` (no model call per event) and a tumbling count window per
key, which turns each valid event into exactly one contribution to one window result or, when an
outage made the watermark pass its window first, into one `late` dead letter. `reviews` (the shape of
examples/streamer.yaml's `reviews` route): the same window on a route that also classifies every
event with a model (a tiny random Llama on CPU, tests/tiny.py), so each valid event also has exactly
one answer, and each window counts its events' labels; model requests are in flight whenever a fault
lands. Every 25th message is not JSON and must land on the dead-letter topic as `invalid_json`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streamer.state.server import free_port, redis_binary
from tests.integration.services import KAFKA_SH, committed_offsets, counters, end_offsets, unique_name
from tests.tiny import save_tiny_llama

WINDOW_MS = 2000
KEYS = 8
LABELS = ("good", "bad")
STARTED: list[subprocess.Popen] = []
"""Service processes of the running test; tests/faults/conftest.py kills any left when it ends."""


@dataclass(frozen=True)
class Stream:
    """`events` messages, ordered in event time per key; every `invalid_every`th is not JSON."""

    events: int = 2400
    invalid_every: int = 25
    step_ms: int = 10
    base_ms: int = field(default_factory=lambda: (int(time.time() * 1000) - 3_600_000) // WINDOW_MS * WINDOW_MS)

    def message(self, i: int) -> tuple[bytes, bytes]:
        key = f"k{i % KEYS}"
        if i % self.invalid_every == self.invalid_every - 1:
            return key.encode(), f"not json {i}".encode()
        return key.encode(), orjson.dumps({"id": f"e-{i}", "key": key, "text": f"event {i}", "ts": self.ts(i)})

    def ts(self, i: int) -> int:
        return self.base_ms + i * self.step_ms

    @property
    def invalid(self) -> int:
        return self.events // self.invalid_every

    def expected_windows(self) -> Counter[tuple[str, int]]:
        """(key, window start) -> valid events in that window."""
        return Counter((f"k{i % KEYS}", self.ts(i) // WINDOW_MS * WINDOW_MS) for i in range(self.events)
                       if i % self.invalid_every != self.invalid_every - 1)


def produce(bootstrap: str, topic: str, stream: Stream, start: int, stop: int, rate_per_s: float | None) -> None:
    """Produce messages [start, stop) at about `rate_per_s` (None: at once); every one acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5,
                         "message.timeout.ms": 120_000})
    failed: list[KafkaError] = []
    began = time.monotonic()
    for i in range(start, stop):
        key, value = stream.message(i)
        producer.produce(topic, value, key=key, on_delivery=lambda err, _m: err and failed.append(err))
        producer.poll(0)
        if rate_per_s is not None:
            time.sleep(max(0.0, began + (i - start + 1) / rate_per_s - time.monotonic()))
    assert producer.flush(120) == 0 and not failed, failed[:3]


@contextlib.contextmanager
def producing(bootstrap: str, topic: str, stream: Stream, start: int, rate_per_s: float) -> Iterator[None]:
    """Produce the rest of the stream, from `start`, in the background at `rate_per_s`; joined on exit."""
    thread = threading.Thread(target=produce, args=(bootstrap, topic, stream, start, stream.events, rate_per_s))
    thread.start()
    try:
        yield
    finally:
        thread.join(180)


@dataclass
class Service:
    """Names and config of one scenario's pipeline (one consumer group, any number of instances)."""

    tmp: Path
    bootstrap: str
    redis_url: str
    guarantee: str = "exactly_once"
    tag: str = field(default_factory=lambda: unique_name("fault"))
    http_port: int | None = None
    # short, so a killed instance's open transaction stops blocking read_committed readers soon
    transaction_timeout_ms: int = 10_000
    # short, so a killed member's partitions move after 6 s rather than 45 s
    session_timeout_ms: int = 6000
    max_queue: int = 64  # outcomes waiting for Kafka and Redis before consumption pauses
    shape: str = "count"  # or "reviews": classify every event on a tiny model, and count windows
    max_poll_interval_ms: int | None = None  # librdkafka's default (300 s) unless set
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.tmp / "service.log"

    @property
    def input(self) -> str:
        return f"in-{self.tag}"

    @property
    def output(self) -> str:
        return f"win-{self.tag}"

    @property
    def dead_letters(self) -> str:
        return f"dlq-{self.tag}"

    @property
    def answers(self) -> str:
        return f"ans-{self.tag}"

    @property
    def group(self) -> str:
        return f"g-{self.tag}"

    def config(self, instance: str) -> Path:
        path = self.tmp / f"{instance}.yaml"
        client: dict[str, int] = {"session.timeout.ms": self.session_timeout_ms, "heartbeat.interval.ms": 1000}
        if self.max_poll_interval_ms is not None:
            client["max.poll.interval.ms"] = self.max_poll_interval_ms
        window = {"kind": "tumbling", "size_ms": WINDOW_MS, "idle_timeout_ms": 2000, "output": self.output}
        route: dict[str, Any] = {"name": "w", "input": self.input, "task": "none", "window": window}
        settings: dict[str, Any] = {
            "kafka": {"bootstrap_servers": self.bootstrap, "group_id": self.group,
                      "dead_letter_topic": self.dead_letters, "commit_interval_ms": 200, "client": client},
            "redis": {"url": self.redis_url, "prefix": self.tag},
            "observe": {"http_host": "127.0.0.1", "http_port": self.http_port},
            "batching": {"max_queue": self.max_queue},
            "processing": {"guarantee": self.guarantee, "transactional_id": f"{self.tag}-{instance}",
                           "transaction_timeout_ms": self.transaction_timeout_ms},
            "routes": [route],
        }
        if self.shape == "reviews":
            route |= {"task": "classify", "labels": list(LABELS), "output": self.answers}
            model = self.tmp / "tiny"
            if not model.exists():
                save_tiny_llama(model)
            settings["model"] = {"path": str(model), "device": "cpu", "dtype": "float32"}
            settings["engine"] = {"kind": "continuous", "workers": 1, "kv_cache_gib": 0.02}
        path.write_text(yaml.safe_dump(settings))
        return path

    def start(self, instance: str = "a") -> subprocess.Popen:
        with self.log.open("ab") as out:
            out.write(f"--- start {instance} at {time.time():.3f}\n".encode())
            process = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config",
                                        str(self.config(instance))],
                                       stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        STARTED.append(process)
        return process

    def counters(self) -> dict[str, int]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return counters(client, self.tag)
        finally:
            client.close()

    def committed(self) -> dict[int, int]:
        """The group's committed offsets; {} while a transaction's offsets are pending (KIP-447: the
        offset fetch waits for them, e.g. a killed instance's open transaction until it times out)."""
        try:
            return committed_offsets(self.bootstrap, self.group, self.input)
        except KafkaException:
            return {}

    def finished(self) -> bool:
        """Every input message committed (offsets at the end of every partition)."""
        ends = end_offsets(self.bootstrap, self.input)
        return bool(ends) and self.committed() == ends

    def progressed(self) -> Callable[[], bool]:
        """A condition: the group committed past where it stands now (recovery after a fault)."""
        before = self.committed()
        return lambda: any(o > before.get(p, 0) for p, o in self.committed().items())

    def wait(self, condition: Any, timeout_s: float, what: str) -> float:
        """Seconds until `condition()` held; fails with the service log's tail after `timeout_s`."""
        began = time.monotonic()
        while not condition():
            if time.monotonic() - began > timeout_s:
                raise AssertionError(f"timed out waiting for {what}; log:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)
        return time.monotonic() - began


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(30)


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(60)


def read_topic(bootstrap: str, topic: str, *, committed: bool, timeout_s: float = 60) -> list[bytes]:
    """Every value on the topic, read to the end of each partition (the last stable offset when
    `committed`, i.e. with isolation.level=read_committed)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("read"), "enable.auto.commit": False,
                         "enable.partition.eof": True,
                         "isolation.level": "read_committed" if committed else "read_uncommitted"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        values: list[bytes] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(at_end) < len(meta.partitions):
            assert time.monotonic() < deadline, f"{topic}: not at the end after {timeout_s} s"
            for message in consumer.consume(500, timeout=0.5):
                error = message.error()
                if error is None:
                    values.append(message.value())
                    at_end.discard(message.partition())
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
                else:
                    raise AssertionError(f"reading {topic}: {error.str()}")
        return values
    finally:
        consumer.close()


@dataclass(frozen=True)
class Outcome:
    """What one scenario's run produced, as RELIABILITY.md reports it."""

    sent: int
    results: int  # valid events accounted for: counted in a window, or dead-lettered as late
    duplicates: int
    losses: int
    windows: int
    late: int


def check(service: Service, stream: Stream) -> Outcome:
    """Assert the promises: each valid event counted exactly once (in a window result or as a late dead
    letter), the invalid ones dead-lettered exactly once, Redis counters exact, offsets at the end.

    Exactly once: read with read_committed and no de-duplication. At least once: window results are
    de-duplicated by window id and dead letters by source offset, as the README tells consumers to."""
    exactly_once = service.guarantee == "exactly_once"
    results = [orjson.loads(v) for v in read_topic(service.bootstrap, service.output, committed=exactly_once)]
    letters = [orjson.loads(v) for v in read_topic(service.bootstrap, service.dead_letters, committed=exactly_once)]
    finals = [r for r in results if r["final"]]
    by_window = {r["id"]: r for r in finals}
    by_offset = {(d["source"]["partition"], d["source"]["offset"]): d for d in letters}
    duplicates = (len(finals) - len(by_window)) + (len(letters) - len(by_offset))
    if not exactly_once:
        finals, letters = list(by_window.values()), list(by_offset.values())

    late = [d for d in letters if d["error"] == "late"]
    counted: Counter[tuple[str, int]] = Counter()
    for result in finals:
        counted[(result["key"], result["window"]["start"])] += result["count"]
    for letter in late:
        event = orjson.loads(letter["payload"])
        counted[(event["key"], event["ts"] // WINDOW_MS * WINDOW_MS)] += 1
    expected = stream.expected_windows()
    losses = sum((expected - counted).values())
    extra = sum((counted - expected).values())

    assert (losses, extra) == (0, 0), f"lost {losses}, counted twice {extra}"
    if service.shape == "reviews":
        duplicates += check_answers(service, stream, exactly_once)
        for result in finals:
            assert sum(result["labels"].values()) == result["count"], f"window {result['id']}: labels {result}"
    assert duplicates == 0 or not exactly_once, f"{duplicates} duplicates read with read_committed"
    assert Counter(d["error"] for d in letters) == Counter({"invalid_json": stream.invalid, "late": len(late)})
    assert len({d["id"] for d in late}) == len(late)
    state = service.counters()
    assert state.get("dead_letters", 0) == len(letters)
    assert state.get("dead_letters:invalid_json", 0) == stream.invalid
    assert state.get("dead_letters:late", 0) == len(late)
    assert state.get("windows", 0) == len(finals)
    assert service.finished()
    return Outcome(stream.events, sum(counted.values()), duplicates, losses, len(finals), len(late))


def check_answers(service: Service, stream: Stream, exactly_once: bool) -> int:
    """Every valid event answered (exactly once with read_committed), with one of the labels; returns
    how many answers were repeated (at least once: a replayed event, same id)."""
    answers = [orjson.loads(v) for v in read_topic(service.bootstrap, service.answers, committed=exactly_once)]
    by_source = {(a["source"]["partition"], a["source"]["offset"]): a for a in answers}
    valid = stream.events - stream.invalid
    assert len(by_source) == valid, f"{len(by_source)} events answered of {valid}"
    assert {a["output"] for a in answers} <= set(LABELS)
    repeated = len(answers) - len(by_source)
    assert repeated == 0 or not exactly_once, f"{repeated} answers read twice with read_committed"
    assert service.counters().get("answers", 0) == valid
    return repeated


def report(name: str, outcome: Outcome, recovery_s: float) -> None:
    """One line per scenario; RELIABILITY.md's table is made of these (run pytest with -s)."""
    print(f"\nRELIABILITY {name}: sent={outcome.sent} results={outcome.results} duplicates={outcome.duplicates} "
          f"losses={outcome.losses} windows={outcome.windows} late={outcome.late} recovery_s={recovery_s:.1f}")


class RestartableRedis:
    """A redis-server of the test's own, on a fixed port with an fsync-always AOF, so it can be stopped
    and started again with its data (the shared session server must not be stopped)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._args = [redis_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(directory),
                      "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self._log = directory / "redis.log"
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(self._args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                if client.ping():
                    break
            assert time.monotonic() < deadline and self._proc.poll() is None, self._log.read_text()[-2000:]
            time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # SIGTERM: redis-server flushes its AOF and exits
            self._proc.wait(20)


class RestartableKafka:
    """A broker of the test's own (`ops/kafka/kafka.sh start`), stopped and started again on the same
    data: kafka.sh formats fresh storage on every start, so the restart runs the same java command
    against the run dir's server.properties, without formatting."""

    def __init__(self, run_dir: Path, bootstrap: str) -> None:
        self._dir = run_dir
        self._port = bootstrap.rpartition(":")[2]
        self._log = run_dir / "server.log"

    def stop(self) -> None:
        subprocess.run([str(KAFKA_SH), "stop", "--port", self._port, "--dir", str(self._dir)],
                       capture_output=True, timeout=60, check=True)

    def start(self, timeout_s: float = 120) -> None:
        started = self._log.read_text().count("Kafka Server started")
        java = ["java", "-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self._dir / 'log4j2.properties'}", f"-Dkafka.logs.dir={self._dir}",
                "-cp", str(KAFKA_SH.parent / "lib" / "*"), "kafka.Kafka", str(self._dir / "server.properties")]
        with (self._dir / "kafka.out").open("ab") as out:
            process = subprocess.Popen(java, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        (self._dir / "kafka.pid").write_text(str(process.pid))  # so kafka.sh stop ends it at teardown
        deadline = time.monotonic() + timeout_s
        while self._log.read_text().count("Kafka Server started") <= started:
            assert process.poll() is None and time.monotonic() < deadline, "the broker did not come back"
            time.sleep(0.2)
