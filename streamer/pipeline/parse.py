"""Turns raw Kafka bytes into an InputEvent, or into a DeadLetter that says precisely why not.

Per-item failures are values here, never exceptions: one bad message must not stop the stream.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Collection
from dataclasses import dataclass

import orjson
from pydantic import ValidationError

from streamer.config import LimitsSettings
from streamer.contracts import DeadLetter, ErrorCode, InputEvent, Source

PAYLOAD_CAP_BYTES = 256 * 1024


@dataclass(slots=True)
class RawMessage:
    """The parts of a consumed Kafka message that decoding needs; never changed once made (not frozen: one is
    made per record, and a frozen dataclass's __init__ costs three times as much)."""

    value: bytes | None
    key: bytes | None
    timestamp_ms: int | None  # None: the record has none (the handler uses processing time)
    topic: str
    partition: int
    offset: int

    @property
    def source(self) -> Source:
        """Built only when a record needs it: most events never leave a per-event record."""
        return Source(topic=self.topic, partition=self.partition, offset=self.offset)


def dead_letter(raw: RawMessage, code: ErrorCode, detail: str, event_id: str | None = None) -> DeadLetter:
    """A DeadLetter keeping the original bytes (as text when they are UTF-8, else base64)."""
    whole = raw.value or b""
    value = whole[:PAYLOAD_CAP_BYTES]  # a dead letter must stay under the broker's message size limit
    try:
        payload, encoding = value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(value).decode("ascii"), "base64"
    return DeadLetter(
        error=code,
        detail=detail[:2000],
        id=event_id,
        payload=payload,
        payload_encoding=encoding,
        payload_truncated=len(whole) > PAYLOAD_CAP_BYTES,
        source=raw.source,
        ts=int(time.time() * 1000),
    )


def _schema_detail(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "(event)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def decode(
    raw: RawMessage, *, default_task: str, known_tasks: Collection[str], limits: LimitsSettings
) -> InputEvent | DeadLetter:
    """Parse and validate one message; fill `key`, `ts` and `task` defaults from Kafka and the route.

    Every string that reaches an output is bounded here or by the contract (`id`, `key`, `text`,
    `params`), and so is `meta`, which answers carry: its depth (JSON nested past orjson's 255 levels
    cannot be written back) and its size."""
    if not raw.value:
        return dead_letter(raw, ErrorCode.INVALID_JSON, "empty message")
    try:
        doc = orjson.loads(raw.value)
    except orjson.JSONDecodeError as exc:
        return dead_letter(raw, ErrorCode.INVALID_JSON, str(exc))
    if not isinstance(doc, dict):
        return dead_letter(raw, ErrorCode.SCHEMA, f"expected a JSON object, got {type(doc).__name__}")
    event_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    if doc.get("key") is None:  # defaults go in before validation: cheaper than copying the model
        doc["key"] = _key_text(raw.key)
    if doc.get("ts") is None:
        doc["ts"] = raw.timestamp_ms
    if doc.get("task") is None:
        doc["task"] = default_task
    if (problem := _meta_problem(doc.get("meta"), limits)) is not None:
        return dead_letter(raw, ErrorCode.SCHEMA, f"meta: {problem}", event_id)
    try:
        event = InputEvent.model_validate(doc)
    except ValidationError as exc:
        return dead_letter(raw, ErrorCode.SCHEMA, _schema_detail(exc), event_id)
    if len(event.text) > limits.max_chars:
        detail = f"text has {len(event.text)} characters; the limit is {limits.max_chars}"
        return dead_letter(raw, ErrorCode.TOO_LONG, detail, event.id)
    if event.task not in known_tasks:
        detail = f"unknown task {event.task!r}; known: {', '.join(sorted(known_tasks))}"
        return dead_letter(raw, ErrorCode.UNKNOWN_TASK, detail, event.id)
    return event


def _meta_problem(meta: object, limits: LimitsSettings) -> str | None:
    """Why `meta` cannot pass through to an answer (too deep, too large), or None."""
    if meta is None:
        return None
    stack: list[tuple[object, int]] = [(meta, 1)]
    while stack:
        value, depth = stack.pop()
        if not isinstance(value, dict | list):
            continue
        if depth > limits.max_meta_depth:
            return f"nested deeper than {limits.max_meta_depth} levels (limits.max_meta_depth)"
        stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    size = len(orjson.dumps(meta))
    if size > limits.max_meta_bytes:
        return f"{size} bytes of JSON; the limit is {limits.max_meta_bytes} (limits.max_meta_bytes)"
    return None


def _key_text(key: bytes | None) -> str | None:
    if key is None:
        return None
    return key.decode("utf-8", errors="replace")
