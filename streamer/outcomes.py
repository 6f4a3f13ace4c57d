"""Outcomes, sealed where they are made: serialized and size-checked once, before any writer sees them.

A record that cannot be serialized (a value JSON cannot hold) or would exceed the record size limit
becomes a small dead letter in its place (`unserializable`, `too_large`), addressed to the dead-letter
topic and finishing the same events; a dead letter itself is cut to fit: its payload is shortened
after escaping (a control character is 6 bytes of JSON), and its id, detail and Kafka key are capped.
So every outcome the writers receive is one record they can produce, and one bad record never stops
the stream. (The broker may still refuse a record, e.g. a topic with a lower `max.message.bytes`: the
writers replace such a record in the same way, see `Writer`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from streamer.contracts import Answer, DeadLetter, ErrorCode, WindowResult
from streamer.kafka.offsets import Ref

Record = Answer | DeadLetter | WindowResult

RECORD_OVERHEAD_BYTES = 512
"""Kept free under the size limit for the protocol's framing, which librdkafka counts in `message.max.bytes`."""
MAX_KEY_BYTES = 1024
"""A dead letter's Kafka key is the input's: capped, as an input key may be as large as the broker allows."""
MAX_DETAIL_CHARS = 2000
MAX_ID_CHARS = 256


@dataclass(frozen=True)
class Outcome:
    """A result, addressed and serialized: where it goes, its bytes, and which events' parts it finishes.

    `in_order`: write it only once every event it finishes lies below its partition's commit point, so
    a replay can never rebuild part of it (session windows at least once: a session rebuilt from a
    suffix of its events would get another id). `digest`: an answer kept in Redis for reuse, with the
    digest of what it answered (`streamer.pipeline.reuse`)."""

    topic: str
    kafka_key: bytes | None
    record: Record
    payload: bytes
    releases: tuple[Ref, ...]
    route: str
    in_order: bool = False
    digest: str | None = None


class Unwritable(ValueError):
    """A record that can never be produced, with the dead-letter code that replaces it."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code


@dataclass(frozen=True)
class Sealer:
    """Seals outcomes under one size limit: the effective `message.max.bytes` of the producer."""

    max_record_bytes: int
    dead_letter_topic: str

    def seal(self, topic: str, kafka_key: bytes | None, record: Record, releases: tuple[Ref, ...], route: str,
             *, in_order: bool = False, digest: str | None = None) -> Outcome:
        """The outcome of `record`, or of the dead letter that replaces it when it cannot be written."""
        if isinstance(record, DeadLetter):
            return self._dead_letter(topic, kafka_key, record, releases, route)
        try:
            payload = self._check(serialize(record), kafka_key)
        except Unwritable as exc:
            return self.replacement(record, exc.code, str(exc), releases, route, in_order=in_order)
        return Outcome(topic, kafka_key, record, payload, releases, route, in_order, digest)

    def reused(self, topic: str, kafka_key: bytes | None, answer: Answer, payload: bytes, releases: tuple[Ref, ...],
               route: str, digest: str | None) -> Outcome:
        """The outcome of an answer kept in Redis, `answer` parsed from its `payload`: the stored bytes as they
        are (a replay writes what the first run wrote), still checked against today's size limit."""
        try:
            checked = self._check(payload, kafka_key)
        except Unwritable as exc:
            return self.replacement(answer, exc.code, str(exc), releases, route)
        return Outcome(topic, kafka_key, answer, checked, releases, route, digest=digest)

    def replacement(self, record: Record, code: ErrorCode, detail: str, releases: tuple[Ref, ...],
                    route: str, *, in_order: bool = False) -> Outcome:
        """The dead letter standing for a record that cannot be written (here, or refused by the broker);
        it finishes the same events under the same ordering rule. One standing for a window result has no
        `source` (no event of its own)."""
        if isinstance(record, DeadLetter):  # a dead letter refused: keep it, cut to its bare facts
            letter = replace_letter(record, payload="", payload_truncated=True)
        else:
            letter = DeadLetter(error=code, detail=detail, id=record.id, payload=_text(record),
                                payload_encoding="utf-8", source=getattr(record, "source", None),
                                ts=_emitted_ms(record))
        key = record.key.encode() if not isinstance(record, DeadLetter) and record.key is not None else None
        return self._dead_letter(self.dead_letter_topic, key, letter, releases, route, in_order=in_order)

    def _dead_letter(self, topic: str, kafka_key: bytes | None, letter: DeadLetter, releases: tuple[Ref, ...],
                     route: str, *, in_order: bool = False) -> Outcome:
        key = kafka_key[:MAX_KEY_BYTES] if kafka_key is not None else None
        letter = replace_letter(letter, detail=letter.detail[:MAX_DETAIL_CHARS],
                                id=letter.id[:MAX_ID_CHARS] if letter.id is not None else None)
        letter, payload = fit(letter, self.max_record_bytes - RECORD_OVERHEAD_BYTES - len(key or b""))
        return Outcome(topic, key, letter, payload, releases, route, in_order)

    def _check(self, payload: bytes, kafka_key: bytes | None) -> bytes:
        size = len(payload) + len(kafka_key or b"") + RECORD_OVERHEAD_BYTES
        if size > self.max_record_bytes:
            raise Unwritable(ErrorCode.TOO_LARGE, f"the record would be {size} bytes; the limit is "
                             f"{self.max_record_bytes} (limits.max_record_bytes, message.max.bytes)")
        return payload


def serialize(record: Record) -> bytes:
    """The record's JSON bytes; Unwritable(`unserializable`) when JSON cannot hold it."""
    try:
        return orjson.dumps(record.model_dump(mode="json"))
    except (TypeError, ValueError) as exc:  # depth, integers past 64 bits, ...
        raise Unwritable(ErrorCode.UNSERIALIZABLE, f"{type(exc).__name__}: {exc}"[:MAX_DETAIL_CHARS]) from None


def fit(letter: DeadLetter, budget: int) -> tuple[DeadLetter, bytes]:
    """The dead letter with its payload cut (after escaping) so that it serializes within `budget` bytes."""
    payload = orjson.dumps(letter.model_dump(mode="json"))
    if len(payload) <= budget:
        return letter, payload
    text, low, high = letter.payload, 0, len(letter.payload)
    while low < high:  # the longest prefix that fits: bisect on its length
        middle = (low + high + 1) // 2
        if len(_dump(letter, text[:middle])) <= budget:
            low = middle
        else:
            high = middle - 1
    cut = replace_letter(letter, payload=text[:low], payload_truncated=True)
    return cut, _dump(letter, text[:low])


def _dump(letter: DeadLetter, payload: str) -> bytes:
    return orjson.dumps(replace_letter(letter, payload=payload, payload_truncated=True).model_dump(mode="json"))


def replace_letter(letter: DeadLetter, **changes: object) -> DeadLetter:
    return letter.model_copy(update=changes)


def _text(record: Record) -> str:
    """As much of a record as can be shown in a dead letter's payload."""
    try:
        return orjson.dumps(record.model_dump(mode="json")).decode()
    except (TypeError, ValueError):
        return repr(record)[:MAX_DETAIL_CHARS]


def _emitted_ms(record: Record) -> int:
    return record.emitted_at if isinstance(record, WindowResult) else record.ts_out  # type: ignore[union-attr]

