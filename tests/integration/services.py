"""Real services for the integration tests, and small Kafka helpers to drive and inspect them.

Kafka comes from, in order: $KAFKA_BOOTSTRAP_SERVERS; a testcontainers broker when a Docker engine
answers (and testcontainers is installed); else the native broker of `ops/kafka/kafka.sh` (jars pinned
in ops/kafka/pom.xml), so the suite needs neither Docker nor a network once the jars are fetched.
Redis comes from $REDIS_URL, else a redis-server child process (streamer.state.server.RedisServer).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streamer.state.server import free_port

KAFKA_SH = Path(__file__).resolve().parents[2] / "ops" / "kafka" / "kafka.sh"
LLAMA_SH = Path(__file__).resolve().parents[2] / "ops" / "llama" / "llama.sh"


@dataclass(frozen=True)
class Record:
    """What a test needs of a Kafka message, detached from the client that read or wrote it."""

    key: bytes | None
    value: bytes | None
    partition: int
    offset: int
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp_ms: int | None = None  # the record's timestamp (CreateTime: when its producer produced it)


def unique_name(prefix: str) -> str:
    """A topic/group/prefix name no other test (or earlier run against the same broker) has used."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- where the services come from -------------------------------------------------------------------


def docker_available(timeout_s: float = 5.0) -> bool:
    """True when a Docker engine answers, not merely when the docker CLI is installed."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=timeout_s).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def container_kafka() -> Iterator[str | None]:
    """A testcontainers KRaft broker; yields None when testcontainers is not installed."""
    try:
        from testcontainers.kafka import KafkaContainer  # optional dependency
    except ImportError:
        yield None
        return
    with KafkaContainer().with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


@contextlib.contextmanager
def native_kafka(run_dir: Path, start_timeout_s: float = 180.0, start_args: Sequence[str] = ()) -> Iterator[str]:
    """`ops/kafka/kafka.sh start [start_args]` on a free port in run_dir (fetching jars if needed); stopped after."""
    port = str(free_port())
    args = ["--port", port, "--dir", str(run_dir)]
    try:
        started = subprocess.run(
            [str(KAFKA_SH), "start", *args, *start_args], capture_output=True, text=True, timeout=start_timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        subprocess.run([str(KAFKA_SH), "stop", *args], capture_output=True, timeout=60)
        raise RuntimeError(f"kafka.sh start took over {start_timeout_s}s: {exc.stderr!r}") from exc
    try:
        if started.returncode != 0:
            raise RuntimeError(f"kafka.sh start failed ({started.returncode}):\n{started.stderr}")
        yield started.stdout.strip().rpartition("bootstrap=")[2]
    finally:
        subprocess.run([str(KAFKA_SH), "stop", *args], capture_output=True, timeout=60)


@contextlib.contextmanager
def kafka_service(run_dir: Path) -> Iterator[str]:
    """The bootstrap servers of the broker the suite runs against (see the module docstring)."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if docker_available():
        with container_kafka() as bootstrap:
            if bootstrap is not None:
                yield bootstrap
                return
    with native_kafka(run_dir) as bootstrap:
        yield bootstrap


@dataclass(frozen=True)
class LlamaServer:
    """A running `llama-server` (ops/llama/llama.sh): where it answers and how to stop or restart it."""

    base_url: str  # http://127.0.0.1:PORT/v1
    args: tuple[str, ...]  # --port N --dir D

    def stop(self) -> None:
        subprocess.run([str(LLAMA_SH), "stop", *self.args], capture_output=True, timeout=60, check=True)

    def start(self, extra: str = "", timeout_s: float = 180.0) -> None:
        """Start it (again) on the same port; `extra` is added to its flags (LLAMA_ARGS)."""
        env = {**os.environ, "LLAMA_ARGS": extra} if extra else None
        started = subprocess.run([str(LLAMA_SH), "start", *self.args], capture_output=True, text=True,
                                 timeout=timeout_s, env=env)
        if started.returncode != 0:
            raise RuntimeError(f"llama.sh start failed ({started.returncode}):\n{started.stderr}")


@contextlib.contextmanager
def llama_service(run_dir: Path, extra: str = "") -> Iterator[LlamaServer]:
    """llama.cpp's llama-server on a free port serving the default model's GGUF (built on first use, about
    5 min), stopped after."""
    port = free_port()
    server = LlamaServer(f"http://127.0.0.1:{port}/v1", ("--port", str(port), "--dir", str(run_dir)))
    try:
        server.start(extra, timeout_s=900)
        yield server
    finally:
        subprocess.run([str(LLAMA_SH), "stop", *server.args], capture_output=True, timeout=60)


# --- Kafka helpers ----------------------------------------------------------------------------------


def _consumer(bootstrap: str, group: str | None = None) -> Consumer:
    # Consumers never auto-create topics, so inspecting a topic that does not exist yet leaves it so.
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group or unique_name("inspect"),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )


def _partitions(client: Consumer, topic: str, timeout_s: float = 10.0) -> list[int]:
    """The topic's partitions, or [] when it does not exist."""
    meta = client.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if meta is None or meta.error is not None:
        return []
    return sorted(meta.partitions)


def create_topic(bootstrap: str, name: str, partitions: int = 3, timeout_s: float = 30.0) -> None:
    """Create the topic and wait until its metadata shows every partition with a leader."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[name].result(timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        meta = admin.list_topics(name, timeout=timeout_s).topics.get(name)
        if (
            meta
            and meta.error is None
            and len(meta.partitions) == partitions
            and all(p.leader >= 0 for p in meta.partitions.values())
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {name} not ready after {timeout_s}s: {meta}")
        time.sleep(0.1)


def produce_lines(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes],
    keys: Sequence[bytes | None] | None = None,
    timeout_s: float = 30.0,
    partitions: Sequence[int] | None = None,
) -> list[Record]:
    """Produce, flush and assert every message was acknowledged (acks=all); returns where each landed.

    A missing topic is auto-created by the broker with its default partition count.
    """
    if keys is not None:
        assert len(keys) == len(values), "keys and values differ in length"
    delivered: list[Record] = []
    failed: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failed.append(err)
        else:
            delivered.append(Record(msg.key(), msg.value(), msg.partition(), msg.offset()))

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5})
    for i, value in enumerate(values):
        key = None if keys is None else keys[i]
        if partitions is None:
            producer.produce(topic, value, key=key, on_delivery=on_delivery)
        else:
            producer.produce(topic, value, key=key, partition=partitions[i], on_delivery=on_delivery)
        producer.poll(0)
    left = producer.flush(timeout_s)
    assert left == 0 and not failed, f"{left} undelivered, errors: {failed[:5]}"
    assert len(delivered) == len(values)
    return delivered


def consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Record]:
    """Read the topic from the beginning of every partition under a fresh group, committing nothing.

    Returns as soon as `expected` records arrived, else whatever came within timeout_s (the caller
    asserts). Waits for the topic to exist, so it can read an output topic another process creates.
    """
    consumer = _consumer(bootstrap)
    records: list[Record] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not (partitions := _partitions(consumer, topic)):
            if time.monotonic() > deadline:
                return records
            time.sleep(0.2)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        while len(records) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise RuntimeError(f"consuming {topic}: {msg.error()}")
                records.append(Record(msg.key(), msg.value(), msg.partition(), msg.offset(), list(msg.headers() or []),
                                      msg.timestamp()[1]))
    finally:
        consumer.close()
    return records


def end_offsets(bootstrap: str, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Partition -> high watermark (the offset the next message will get); {} for a missing topic."""
    consumer = _consumer(bootstrap)
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
            for p in _partitions(consumer, topic, timeout_s)
        }
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Partition -> the group's committed offset, for every partition of the topic.

    A partition the group never committed reports 0, where an earliest-reset consumer would start, so
    "the group has finished the topic" reads `committed_offsets(...) == end_offsets(...)` even when some
    partitions are empty. Looking does not join the group (no subscribe), so it never triggers a rebalance.
    """
    consumer = _consumer(bootstrap, group)
    try:
        partitions = _partitions(consumer, topic, timeout_s)
        if not partitions:
            return {}
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout_s)
        return {tp.partition: max(tp.offset, 0) for tp in committed}
    finally:
        consumer.close()


# --- the service as a process -----------------------------------------------------------------------


def start_service(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streamer", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def counters(client: redis.Redis, prefix: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(f"{prefix}:counters").items()}


def wait_for(condition, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; service log:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


# --- secured services -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate it signed, valid for 127.0.0.1 and localhost (PEM files)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Generate the CA and server certificate with the openssl CLI (P-256 keys: fast to make)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=streamer test CA")
    openssl("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")


def sasl_kafka(run_dir: Path, user: str, password: str, tls: TlsFiles | None = None
               ) -> contextlib.AbstractContextManager[str]:
    """A native broker of its own whose only client listener is SASL_PLAINTEXT (SCRAM-SHA-256/512, PLAIN),
    or SASL_SSL with `tls` (made by make_tls_files, whose file names kafka.sh --tls-dir expects)."""
    tls_args = ["--tls-dir", str(tls.ca_file.parent)] if tls is not None else []
    return native_kafka(run_dir, start_args=["--sasl-scram", f"{user}:{password}", *tls_args])
