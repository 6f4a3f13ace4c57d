"""Secure connections: `streamer run` logs into a SASL/SCRAM broker and a password-protected Redis (also
over TLS), refuses to start with wrong credentials within seconds, and never shows a secret.

Two brokers of their own (SASL_PLAINTEXT, and SASL_SSL; SCRAM-SHA-256/512 and PLAIN) and redis-servers
with a requirepass, an ACL user and TLS run for this module; the openssl CLI makes the certificates.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml

from streamer.config import KafkaSettings, RedisSettings
from streamer.errors import StreamerError
from streamer.kafka.client_config import base_config
from streamer.kafka.tools import produce_lines, read_topic
from streamer.state.client_url import client_url
from streamer.state.server import RedisServer, ServerTls, free_port
from tests.integration.services import TlsFiles, counters, make_tls_files, sasl_kafka, unique_name, wait_for

pytestmark = pytest.mark.integration

KAFKA_USER, KAFKA_SECRET = "streamer", "kafka-Secret-7f3a91"
REDIS_SECRET = "redis-Secret-c2e8d4"
ACL_USER, ACL_SECRET = "streamer-app", "acl-Secret-5b7e02"
SECRETS = (KAFKA_SECRET, REDIS_SECRET, ACL_SECRET)
FAIL_FAST_S = 30  # process start (imports) included; the checks themselves take about a second


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with sasl_kafka(tmp_path_factory.mktemp("kafka-sasl"), KAFKA_USER, KAFKA_SECRET) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make certificates with")
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def kafka_tls(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles) -> Iterator[str]:
    with sasl_kafka(tmp_path_factory.mktemp("kafka-sasl-ssl"), KAFKA_USER, KAFKA_SECRET, tls_files) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="module")
def redis_auth() -> Iterator[RedisServer]:
    with RedisServer(password=REDIS_SECRET, users={ACL_USER: ACL_SECRET}) as server:
        yield server


@pytest.fixture(scope="module")
def redis_tls(tls_files: TlsFiles) -> Iterator[tuple[RedisServer, Path]]:
    files = tls_files
    try:
        tls = ServerTls(files.cert_file, files.key_file, files.ca_file)
        server = RedisServer(users={ACL_USER: ACL_SECRET}, tls=tls)
    except StreamerError as exc:  # a redis-server built without TLS refuses --tls-port
        pytest.skip(f"redis-server cannot serve TLS here: {exc}")
    with server:
        yield server, files.ca_file


def sasl(mechanism: str = "SCRAM-SHA-256", password: str = KAFKA_SECRET) -> dict[str, str]:
    return {"mechanism": mechanism, "username": KAFKA_USER, "password": password}


def kafka_client(bootstrap: str, mechanism: str = "SCRAM-SHA-256", tls: dict[str, str] | None = None) -> dict[str, Any]:
    """What the test's own producer and readers need to log in."""
    return base_config(KafkaSettings(sasl=sasl(mechanism), tls=tls), bootstrap)


def write_config(path: Path, tag: str, kafka: dict[str, Any], redis_settings: dict[str, Any], port: int) -> Path:
    path.write_text(yaml.safe_dump({
        "kafka": {"group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}", "commit_interval_ms": 200, **kafka},
        "redis": {"prefix": tag, **redis_settings},
        "batching": {"max_batch": 8, "max_queue": 16},
        "observe": {"http_host": "127.0.0.1", "http_port": port, "json_logs": True},
        "routes": [{"name": "q", "input": f"in-{tag}", "output": f"out-{tag}", "max_new_tokens": 4}],
    }))
    return path


def streamer_run(config: Path) -> list[str]:
    return [sys.executable, "-m", "streamer", "run", "--config", str(config), "--log-level", "debug"]


def run_env(**secrets: str) -> dict[str, str]:
    """The service's environment: secrets come from STREAMER_ variables, as in a deployment."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **secrets}


def events(tag: str, count: int) -> list[bytes]:
    return [orjson.dumps({"id": f"{tag}-{i}", "key": f"k{i % 2}", "text": f"Say hi, number {i}."})
            for i in range(count)]


def test_right_credentials_answer_events_and_no_secret_reaches_logs_metrics_or_dead_letters(
        kafka, redis_auth, tmp_path):
    """SCRAM-SHA-256 to Kafka and requirepass to Redis, both secrets from the environment."""
    tag, port = unique_name("sec"), free_port()
    config = write_config(tmp_path / "streamer.yaml", tag, {"bootstrap_servers": kafka,
                          "sasl": {"mechanism": "SCRAM-SHA-256", "username": KAFKA_USER}},
                          {"url": redis_auth.url}, port)
    client = kafka_client(kafka)
    bad = [b"not json", orjson.dumps({"id": "no-text"})]
    produce_lines(client, f"in-{tag}", [*events(tag, 6), *bad])
    log = tmp_path / "service.log"
    env = run_env(STREAMER_KAFKA__SASL__PASSWORD=KAFKA_SECRET, STREAMER_REDIS__PASSWORD=REDIS_SECRET)
    with log.open("wb") as out:
        service = subprocess.Popen(streamer_run(config), stdout=out, stderr=subprocess.STDOUT, env=env)
    state = redis.Redis.from_url(client_url(RedisSettings(password=REDIS_SECRET), redis_auth.url))
    try:
        wait_for(lambda: counters(state, tag).get("answers", 0) == 6 and counters(state, tag).get("dead_letters") == 2,
                 300, "6 answers and 2 dead letters", log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(60) == 0, log.read_text()[-3000:]
    answers = [m.value() for m in read_topic(client, f"out-{tag}", limit=6, idle_timeout_s=20)]
    letters = [m.value() for m in read_topic(client, f"dlq-{tag}", limit=2, idle_timeout_s=20)]
    assert len(answers) == 6 and len(letters) == 2

    shown = {"log": log.read_text(), "metrics": metrics, "dead letters": b"\n".join(letters).decode()}
    assert "SASL SCRAM-SHA-256 as streamer" in shown["log"]  # the startup summary says how it logged in
    assert f"redis://:***@127.0.0.1:{redis_auth.port}/0" in shown["log"]  # ... and where, password hidden
    for where, text in shown.items():
        for secret in SECRETS:
            assert secret not in text, f"a secret appears in the {where}"


@pytest.mark.parametrize(("mechanism", "kafka_over_tls"), [("SCRAM-SHA-512", True), ("PLAIN", False)])
def test_other_sasl_mechanisms_kafka_tls_and_a_redis_acl_user_over_tls_answer_events(
        request, redis_tls, mechanism, kafka_over_tls, tmp_path):
    server, ca_file = redis_tls
    tls = {"ca_file": str(ca_file)}
    bootstrap = request.getfixturevalue("kafka_tls" if kafka_over_tls else "kafka")
    kafka_tls_settings = tls if kafka_over_tls else None
    tag, port = unique_name("tls"), free_port()
    redis_settings = {"url": server.url, "username": ACL_USER, "password": ACL_SECRET, "tls": tls}
    config = write_config(tmp_path / "streamer.yaml", tag,
                          {"bootstrap_servers": bootstrap, "sasl": sasl(mechanism), "tls": kafka_tls_settings},
                          redis_settings, port)
    produce_lines(kafka_client(bootstrap, mechanism, kafka_tls_settings), f"in-{tag}", events(tag, 3))
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        service = subprocess.Popen(streamer_run(config), stdout=out, stderr=subprocess.STDOUT, env=run_env())
    state = redis.Redis.from_url(client_url(RedisSettings.model_validate(redis_settings), server.url))
    try:
        wait_for(lambda: counters(state, tag).get("answers", 0) == 3, 300, "3 answers over TLS", log)
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(60) == 0, log.read_text()[-3000:]
    assert state.get(f"{tag}:answer:{tag}-0") is not None


def refused_start(config: Path) -> tuple[str, float]:
    """Run the service, which must exit non-zero on its own within FAIL_FAST_S; returns its output and time."""
    started = time.monotonic()
    done = subprocess.run(streamer_run(config), capture_output=True, text=True, env=run_env(), timeout=FAIL_FAST_S * 2)
    elapsed_s = time.monotonic() - started
    assert done.returncode != 0, done.stderr[-3000:]
    return done.stdout + done.stderr, elapsed_s


def test_wrong_kafka_password_fails_the_start_fast_naming_kafka_and_sasl(kafka, redis_auth, tmp_path):
    wrong = "wrong-kafka-Secret-0d1e"
    config = write_config(tmp_path / "streamer.yaml", unique_name("badk"),
                          {"bootstrap_servers": kafka, "sasl": sasl(password=wrong)},
                          {"url": redis_auth.url, "password": REDIS_SECRET}, free_port())
    output, elapsed_s = refused_start(config)
    assert elapsed_s < FAIL_FAST_S
    assert f"Kafka at {kafka} refused the connection (SASL SCRAM-SHA-256 as streamer" in output
    assert "invalid credentials" in output
    assert wrong not in output and REDIS_SECRET not in output


@pytest.mark.parametrize(("username", "password"), [(None, "wrong-redis-Secret-9a"), (None, None),
                                                    (ACL_USER, "wrong-acl-Secret-4c")])
def test_wrong_or_missing_redis_credentials_fail_the_start_fast_naming_redis_and_the_user(
        kafka, redis_auth, username, password, tmp_path):
    config = write_config(tmp_path / "streamer.yaml", unique_name("badr"),
                          {"bootstrap_servers": kafka, "sasl": sasl()},
                          {"url": redis_auth.url, "username": username, "password": password}, free_port())
    output, elapsed_s = refused_start(config)
    assert elapsed_s < FAIL_FAST_S
    assert f"Redis at 127.0.0.1:{redis_auth.port} refused the login of user '{username or 'default'}'" in output
    assert not any(secret in output for secret in (*SECRETS, password or SECRETS[0]))


def test_redis_tls_without_the_ca_fails_the_start_naming_the_certificate(kafka, redis_tls, tmp_path):
    server, _ = redis_tls
    config = write_config(tmp_path / "streamer.yaml", unique_name("badt"),
                          {"bootstrap_servers": kafka, "sasl": sasl()},
                          {"url": server.url, "username": ACL_USER, "password": ACL_SECRET}, free_port())
    output, elapsed_s = refused_start(config)
    assert elapsed_s < FAIL_FAST_S
    assert f"cannot reach Redis at 127.0.0.1:{server.port} (TLS)" in output and "CERTIFICATE_VERIFY_FAILED" in output


def test_kafka_tls_without_the_ca_fails_the_start_naming_the_handshake(kafka_tls, redis_auth, tmp_path):
    config = write_config(tmp_path / "streamer.yaml", unique_name("badkt"),
                          {"bootstrap_servers": kafka_tls, "sasl": sasl(), "tls": {}},
                          {"url": redis_auth.url, "password": REDIS_SECRET}, free_port())
    output, elapsed_s = refused_start(config)
    assert elapsed_s < FAIL_FAST_S
    assert f"Kafka at {kafka_tls} refused the connection (SASL SCRAM-SHA-256 as streamer, TLS)" in output
    assert "SSL handshake failed" in output and "certificate verify failed" in output
