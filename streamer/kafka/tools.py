"""Small producer/consumer helpers behind `streamer produce`, `streamer tail` and the demo."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, Message, Producer

from streamer.errors import StreamerError

_JOIN_GRACE_S = 30.0


def produce_lines(
    config: dict[str, Any],
    topic: str,
    lines: Iterable[bytes],
    key_field: str | None = "key",
    *,
    timeout_s: float = 30.0,
    rate: float | None = None,
    on_record: Callable[[], None] | None = None,
) -> int:
    """Produce one record per non-blank line; the key is the line's `key_field` when it is JSON with one.

    `rate` paces the records (per second) against a start clock, so a slow moment is made up for.
    """
    producer = Producer({**config, "enable.idempotence": True, "linger.ms": 5})
    failures: list[str] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error.str())

    count, started_s = 0, time.monotonic()
    for line in lines:
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        if rate:
            time.sleep(max(0.0, started_s + count / rate - time.monotonic()))
        _produce(producer, topic, _key_of(line, key_field), line, delivered)
        count += 1
        if on_record:
            on_record()
    if producer.flush(timeout_s) or failures:
        raise StreamerError(f"not every record reached {topic}: {failures[:3] or 'flush timed out'}")
    return count


def _produce(producer: Producer, topic: str, key: bytes | None, value: bytes, callback: Any) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=key, on_delivery=callback)
            producer.poll(0)
            return
        except BufferError:
            producer.poll(0.1)


def _key_of(line: bytes, key_field: str | None) -> bytes | None:
    if key_field is None:
        return None
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    value = doc.get(key_field) if isinstance(doc, dict) else None
    return str(value).encode() if value is not None else None


def read_topic(
    config: dict[str, Any],
    topic: str,
    *,
    limit: int | None = None,
    idle_timeout_s: float = 10.0,
    follow: bool = False,
) -> Iterator[Message]:
    """Records of a topic from the beginning, with a throwaway group that commits nothing.

    Stops after `limit` records, or after `idle_timeout_s` without a record (counted from the
    assignment, since joining a group takes seconds) unless `follow`.
    """
    consumer = Consumer(
        {
            **config,
            "group.id": f"streamer-tail-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    assigned_s: list[float] = []
    consumer.subscribe([topic], on_assign=lambda *_: assigned_s.append(time.monotonic()))
    seen, last_s = 0, time.monotonic()
    try:
        while limit is None or seen < limit:
            message = consumer.poll(0.2)
            if message is None:
                quiet_since_s = max(last_s, assigned_s[0]) if assigned_s else last_s + _JOIN_GRACE_S
                if not follow and time.monotonic() - quiet_since_s > idle_timeout_s:
                    return
                continue
            if message.error():
                continue
            seen, last_s = seen + 1, time.monotonic()
            yield message
    finally:
        consumer.close()
