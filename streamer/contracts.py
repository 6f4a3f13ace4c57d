"""What crosses the wire: the input event, the answer and the dead letter.

These pydantic models are the only shapes users see; `streamer schemas` writes their JSON Schemas to
`schemas/`, and a test fails when those files drift from the models.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ErrorCode(StrEnum):
    """Stable dead-letter codes; consumers may switch on them."""

    INVALID_JSON = "invalid_json"
    SCHEMA = "schema"
    TOO_LONG = "too_long"
    UNKNOWN_TASK = "unknown_task"
    FUTURE = "future"  # event time further ahead than limits.max_event_skew_ms
    MODEL_ERROR = "model_error"
    LATE = "late"
    TOO_LARGE = "too_large"  # its output would exceed the record size limit
    UNSERIALIZABLE = "unserializable"  # its output holds a value JSON cannot
    REJECTED = "rejected"  # the broker refused its output for good (e.g. the topic's max.message.bytes)
    CONTEXT_TOO_LONG = "context_too_long"  # the prompt exceeds the remote model server's context
    NO_KEY = "no_key"  # a `chat` event without a key: it names no conversation
    STALE_TURN = "stale_turn"  # a replayed `chat` turn its conversation's history has moved past
    INVALID_OUTPUT = "invalid_output"  # an `extract` answer that does not match its schema (e.g. cut by max_new_tokens)


MAX_TS_MS = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z: the latest event time the contract accepts."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Params(_Strict):
    """Per-event generation settings; absent ones take the route's."""

    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    target_lang: str | None = Field(None, min_length=1, max_length=64, description="for `translate`")
    deadline_ms: int | None = Field(
        None, ge=1, le=86_400_000, description="answer within this many ms of arrival; else the route's slo_ms")


class InputEvent(_Strict):
    """A text event a user produces to an input topic."""

    id: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1, description="non-empty; at most `limits.max_chars` characters")
    key: str | None = Field(None, max_length=256, description="defaults to the Kafka message key")
    ts: int | None = Field(
        None, ge=0, le=MAX_TS_MS, description="event time in epoch ms (RFC 3339 accepted); defaults to the Kafka "
        "timestamp; more than limits.max_event_skew_ms ahead of the record's timestamp is a `future` dead letter")
    task: str | None = Field(None, description="defaults to the route's task")
    params: Params = Params()
    meta: dict[str, Any] | None = Field(
        None, description="passed through to the answer untouched; at most limits.max_meta_bytes as JSON and "
        "limits.max_meta_depth levels deep")

    @field_validator("ts", mode="before")
    @classmethod
    def _rfc3339_to_ms(cls, value: Any) -> Any:
        if isinstance(value, str):
            stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if stamp.tzinfo is None:
                raise ValueError("RFC 3339 time needs a zone offset")
            return int(stamp.timestamp() * 1000)
        if isinstance(value, bool):
            raise ValueError("ts must be epoch milliseconds or RFC 3339")
        return value


class Source(_Strict):
    """Where an event came from: enough to find it again in Kafka."""

    topic: str
    partition: int
    offset: int


class Answer(_Strict):
    """The model's answer to one event, produced to the route's output topic."""

    id: str
    key: str | None
    task: str
    output: str | dict[str, Any] = Field(description="the answer's text; for `extract`, the object its schema matches")
    schema_id: str | None = Field(None, description="extract: the schema `output` matches (its `$id`, or `sha256:` "
                                  "and a hash of it)")
    model: str
    tokens_in: int
    tokens_out: int
    queued_ms: float = Field(description="time from submission until the model took it up: admission to the "
                                         "continuous engine, or the start of its static batch")
    latency_ms: float = Field(description="event arrival in streamer to answer produced")
    source: Source
    ts_in: int = Field(description="event time, epoch ms")
    ts_out: int = Field(description="when the answer was produced, epoch ms")
    meta: dict[str, Any] | None = None


class DeadLetter(_Strict):
    """An event streamer could not answer, with the reason; the original bytes are kept."""

    error: ErrorCode
    detail: str
    id: str | None = Field(None, description="the event id, when it could be read")
    payload: str = Field(description="the original message value (its first 256 KiB, cut further to fit the "
                         "record size limit); for a record that could not be written, that record")
    payload_encoding: str = Field(description="`utf-8`, or `base64` when the bytes were not valid UTF-8")
    payload_truncated: bool = Field(
        False, description="true when the value was cut: longer than 256 KiB, or cut to fit the record size limit")
    source: Source | None = Field(description="where the event came from; null for a window result that could "
                                  "not be written (its id is the window id)")
    ts: int = Field(description="when it was dead-lettered, epoch ms")


class WindowBounds(_Strict):
    """Half-open event-time interval [start, end) in epoch ms."""

    kind: str = Field(description="tumbling, sliding or session")
    start: int
    end: int


class TextStats(_Strict):
    """Text length and prompt-token statistics of a window's events (`stats` windows)."""

    chars_min: int
    chars_max: int
    chars_mean: float
    tokens_total: int
    distinct_keys: int


class WindowResult(_Strict):
    """One window's result: final when the window closed, provisional (`final: false`) in update mode."""

    id: str = Field(description="stable window id; the message key on the window topic")
    route: str
    key: str | None = Field(description="the event key, or null for a window across all keys")
    window: WindowBounds
    count: int
    first_ts: int
    last_ts: int
    late: int = Field(description="late events of this route this process has seen so far, a running count "
                      "(late events never change a result; Redis `{prefix}:late` keeps the total)")
    summary: str | None = None
    labels: dict[str, int] | None = Field(None, description="label counts, for classify routes")
    stats: TextStats | None = None
    model: str | None = None
    final: bool
    emitted_at: int = Field(description="epoch ms")


class PartialDelta(_Strict):
    """Progress of one event's answer on a `stream: true` route, produced to its `partial_output` topic (message
    key = the event key). Best effort and at least once: the answer on the output topic is authoritative."""

    id: str = Field(description="the event id")
    route: str
    key: str | None
    seq: int = Field(ge=0, description="0, 1, 2, ... per event; a gap means pieces were dropped, a replay of the "
                     "event starts again at 0 (possibly with other text, if sampled)")
    delta: str = Field(description="text that follows the previous deltas' (empty on a final marker that adds "
                       "nothing)")
    final: bool = Field(description="the last delta of this event: its answer (or dead letter) follows")
    error: str | None = Field(None, description="on the final marker of an event the model gave no answer: its "
                              "dead letter's code (an answer refused by its topic, e.g. too_large, is not known here)")


CONTRACTS: dict[str, type[BaseModel]] = {
    "input_event": InputEvent,
    "answer": Answer,
    "dead_letter": DeadLetter,
    "window_result": WindowResult,
    "partial_delta": PartialDelta,
}
