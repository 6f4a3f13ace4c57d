"""Decoding: every message becomes an InputEvent or a DeadLetter with a precise code; nothing raises."""

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.config import LimitsSettings
from streamer.contracts import DeadLetter, ErrorCode, InputEvent, Source
from streamer.pipeline.parse import RawMessage, decode

SOURCE = Source(topic="questions", partition=1, offset=42)
TASKS = frozenset({"answer", "translate"})


def run(value: bytes | None, key: bytes | None = b"k", ts_ms: int = 1_700_000_000_000, max_chars: int = 100):
    raw = RawMessage(value=value, key=key, timestamp_ms=ts_ms, topic=SOURCE.topic, partition=SOURCE.partition,
                     offset=SOURCE.offset)
    return decode(raw, default_task="answer", known_tasks=TASKS, limits=LimitsSettings(max_chars=max_chars))


def code_of(value: bytes | None, **kwargs) -> ErrorCode:
    result = run(value, **kwargs)
    assert isinstance(result, DeadLetter), result
    return result.error


def test_a_valid_event_takes_key_time_and_task_defaults_from_kafka_and_the_route():
    event = run(b'{"id": "a", "text": "hi"}')
    assert isinstance(event, InputEvent)
    assert (event.key, event.ts, event.task) == ("k", 1_700_000_000_000, "answer")


def test_fields_in_the_event_win_over_kafka_defaults():
    event = run(b'{"id": "a", "text": "hi", "key": "user-1", "ts": 5, "task": "translate"}')
    assert (event.key, event.ts, event.task) == ("user-1", 5, "translate")


def test_rfc3339_time_becomes_epoch_milliseconds():
    event = run(b'{"id": "a", "text": "hi", "ts": "2024-01-01T00:00:01.500Z"}')
    assert event.ts == 1_704_067_201_500


def test_meta_and_params_pass_through():
    event = run(b'{"id": "a", "text": "hi", "meta": {"user": [1, 2]}, "params": {"max_new_tokens": 7}}')
    assert event.meta == {"user": [1, 2]}
    assert event.params.max_new_tokens == 7


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"not json", ErrorCode.INVALID_JSON),
        (b"", ErrorCode.INVALID_JSON),
        (None, ErrorCode.INVALID_JSON),
        (b"\xff\xfe{}", ErrorCode.INVALID_JSON),
        (b"[1, 2]", ErrorCode.SCHEMA),
        (b'{"text": "no id"}', ErrorCode.SCHEMA),
        (b'{"id": "a", "text": ""}', ErrorCode.SCHEMA),
        (b'{"id": "a", "text": 3}', ErrorCode.SCHEMA),
        (b'{"id": "a", "text": "hi", "surprise": 1}', ErrorCode.SCHEMA),
        (b'{"id": "a", "text": "hi", "ts": "yesterday"}', ErrorCode.SCHEMA),
        (b'{"id": "a", "text": "hi", "params": {"max_new_tokens": 0}}', ErrorCode.SCHEMA),
        (b'{"id": "a", "text": "' + b"x" * 101 + b'"}', ErrorCode.TOO_LONG),
        (b'{"id": "a", "text": "hi", "task": "dance"}', ErrorCode.UNKNOWN_TASK),
    ],
)
def test_bad_messages_become_dead_letters_with_a_precise_code(value, code):
    assert code_of(value) == code


def test_a_dead_letter_keeps_the_original_bytes_and_where_they_came_from():
    letter = run(b"\xff\x00 binary")
    assert letter.payload_encoding == "base64"
    assert base64.b64decode(letter.payload) == b"\xff\x00 binary"
    assert letter.source == SOURCE
    text_letter = run(b'{"id": "x", "text": 1}')
    assert (text_letter.payload, text_letter.payload_encoding, text_letter.id) == (
        '{"id": "x", "text": 1}',
        "utf-8",
        "x",
    )


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(value):
    assert isinstance(run(value), InputEvent | DeadLetter)


@given(
    st.dictionaries(
        st.sampled_from(["id", "text", "key", "ts", "task", "params", "meta", "x"]),
        st.one_of(
            st.none(), st.integers(), st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2)
        ),
        max_size=7,
    )
)
def test_arbitrary_json_objects_never_raise(doc):
    assert isinstance(run(json.dumps(doc).encode()), InputEvent | DeadLetter)


def deep(levels: int) -> bytes:
    return b'{"id": "d", "text": "x", "meta": {"x": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}}"


def test_meta_nested_past_the_limit_is_a_schema_dead_letter_not_a_poison_pill():
    """Review finding 1: a 656-byte event with `meta` 300 levels deep decoded, then killed the writer on
    every restart (its answer could not be serialized)."""
    assert isinstance(run(deep(32)), InputEvent)
    letter = run(deep(33))
    assert isinstance(letter, DeadLetter) and letter.error is ErrorCode.SCHEMA and "meta" in letter.detail
    assert code_of(deep(300)) is ErrorCode.SCHEMA


def test_meta_larger_than_the_limit_is_a_schema_dead_letter():
    big = b'{"id": "m", "text": "x", "meta": {"blob": "' + b"b" * 20_000 + b'"}}'
    letter = run(big)
    assert isinstance(letter, DeadLetter) and letter.error is ErrorCode.SCHEMA and "bytes" in letter.detail


@pytest.mark.parametrize("ts", [18446744073709551615, 253402300800000, 10**30])
def test_event_time_past_the_year_9999_is_a_schema_dead_letter(ts: int):
    """Review finding 4: `ts` near 2^64 decoded, and a window end past 2^64 killed the writer (orjson)."""
    assert code_of(b'{"id": "t", "text": "x", "ts": %d}' % ts) is ErrorCode.SCHEMA
