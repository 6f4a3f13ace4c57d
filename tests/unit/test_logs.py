"""Logging: JSON lines that parse, the run id on each, the plain format, and no secret in any of them."""

import io
import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime

import pytest

from streamer.observe.logs import new_run_id, redact, setup_logging


@pytest.fixture
def capture() -> Iterator[Callable[..., io.StringIO]]:
    """setup_logging into a buffer; the root logger's handlers and level are restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)

    def install(*, json: bool = True, run_id: str = "run-1", level: str = "info") -> io.StringIO:
        buffer = io.StringIO()
        setup_logging(level, json=json, run_id=run_id, stream=buffer)
        return buffer

    yield install
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_lines_parse_with_run_id_and_extra(capture) -> None:
    buffer = capture(run_id="abc123")
    log = logging.getLogger("streamer.test")
    log.info("answered %s", "q-1", extra={"route": "questions", "latency_ms": 12.5})
    log.debug("not at info level")
    log.warning("second")
    first, second = lines(buffer)
    assert first["message"] == "answered q-1"
    assert first["level"] == "info"
    assert first["logger"] == "streamer.test"
    assert first["run_id"] == second["run_id"] == "abc123"
    assert first["route"] == "questions" and first["latency_ms"] == 12.5
    assert datetime.fromisoformat(first["ts"]).tzinfo is not None
    assert second["level"] == "warning" and "route" not in second


def test_json_line_carries_the_traceback(capture) -> None:
    buffer = capture()
    try:
        raise ValueError("bad thing")
    except ValueError:
        logging.getLogger("streamer.test").exception("failed")
    (line,) = lines(buffer)
    assert line["message"] == "failed"
    assert "ValueError: bad thing" in line["exc"]


def test_plain_format_is_for_people(capture) -> None:
    buffer = capture(json=False)
    logging.getLogger("streamer.test").warning("queue full", extra={"depth": 64})
    text = buffer.getvalue()
    assert "WARNING streamer.test: queue full depth=64" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_redis_url_password_is_redacted(capture) -> None:
    buffer = capture()
    logging.getLogger("streamer.test").info("connecting to %s", "redis://app:s3cr3t@redis:6379/0")
    (line,) = lines(buffer)
    assert "s3cr3t" not in json.dumps(line)
    assert line["message"] == "connecting to redis://app:***@redis:6379/0"


def test_sasl_password_message_is_redacted(capture) -> None:
    buffer = capture(json=False)
    log = logging.getLogger("streamer.test")
    log.info("kafka client sasl.username=svc sasl.password=hunter2 ssl.key.password: k3y")
    log.info("config %s", {"sasl.password": "hunter2", "bootstrap.servers": "k:9092"})
    text = buffer.getvalue()
    assert "hunter2" not in text and "k3y" not in text
    assert "sasl.username=svc sasl.password=*** ssl.key.password: ***" in text
    assert "'sasl.password': '***'" in text and "k:9092" in text


def test_secret_extra_fields_and_tracebacks_are_redacted(capture) -> None:
    buffer = capture()
    log = logging.getLogger("streamer.test")
    log.info("settings", extra={"password": "pw1", "kafka": {"sasl.password": "pw2", "group": "g"},
                                "url": "redis://:pw3@h:1"})
    try:
        raise ConnectionError("cannot reach redis://u:pw4@h:1")
    except ConnectionError:
        log.exception("redis down")
    text = buffer.getvalue()
    for secret in ("pw1", "pw2", "pw3", "pw4"):
        assert secret not in text
    first, _ = lines(buffer)
    assert first["kafka"] == {"sasl.password": "***", "group": "g"}
    assert first["url"] == "redis://:***@h:1"


@pytest.mark.parametrize(("text", "expected"), [
    ("redis://user:p@ss@host:6379/0", "redis://user:***@host:6379/0"),
    ("rediss://:only-pass@host", "rediss://:***@host"),
    ("redis://host:6379/0 has no password", "redis://host:6379/0 has no password"),
    ('{"password": "a b", "max_new_tokens": 32}', '{"password": "***", "max_new_tokens": 32}'),
    ("ssl.keystore.password=x,ssl.key.location=/k", "ssl.keystore.password=***,ssl.key.location=/k"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_bad_format_arguments_do_not_raise(capture) -> None:
    buffer = capture()
    logging.getLogger("streamer.test").info("two %s %s", "only-one")
    (line,) = lines(buffer)
    assert "only-one" in line["message"]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("loud", json=True, run_id="x", stream=io.StringIO())


def test_run_ids_are_short_and_distinct() -> None:
    ids = {new_run_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 12 for i in ids)
