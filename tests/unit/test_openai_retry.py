"""Failure classes, jittered exponential backoff and Retry-After."""

import random
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.engine.openai.retry import Backoff, Failure, classify_status, retry_after_s

LLAMA_CPP = ('{"error":{"code":400,"message":"request (3031 tokens) exceeds the available context size (2048 '
             'tokens), try increasing it","type":"exceed_context_size_error"}}')
VLLM = ('{"object":"error","message":"This model\'s maximum context length is 2048 tokens. However, you requested '
        '3100 tokens","type":"BadRequestError","code":400}')


@pytest.mark.parametrize(("status", "body", "failure"), [
    (429, "", Failure.OVERLOADED),
    (503, "loading model", Failure.OVERLOADED),
    (500, "", Failure.SERVER),
    (502, "bad gateway", Failure.SERVER),
    (401, "invalid api key", Failure.AUTH),
    (403, "", Failure.AUTH),
    (400, LLAMA_CPP, Failure.CONTEXT),
    (400, VLLM, Failure.CONTEXT),
    (400, '{"error": "temperature must be >= 0"}', Failure.REJECTED),
    (404, "not found", Failure.REJECTED),
])
def test_an_error_answer_is_classed_by_status_and_body(status: int, body: str, failure: Failure) -> None:
    assert classify_status(status, body) is failure


def test_only_what_trying_again_can_help_is_retried_and_only_absence_opens_the_circuit() -> None:
    assert {f for f in Failure if f.retried} == {Failure.TIMEOUT, Failure.CONNECTION, Failure.SERVER,
                                                Failure.OVERLOADED, Failure.AUTH}
    assert not Failure.OVERLOADED.server_away and Failure.CONNECTION.server_away


@given(st.integers(1, 100), st.integers(0, 2**32))
def test_backoff_doubles_with_jitter_up_to_its_cap(attempt: int, seed: int) -> None:
    backoff = Backoff(base_s=0.1, cap_s=5.0)
    wait = backoff.wait_s(attempt, random.Random(seed))
    ceiling = min(5.0, 0.1 * 2 ** (attempt - 1))
    assert ceiling / 2 <= wait <= ceiling


def test_jitter_spreads_requests_that_failed_together() -> None:
    rng = random.Random(7)
    assert len({Backoff(0.1, 5.0).wait_s(4, rng) for _ in range(20)}) == 20


def test_retry_after_is_a_floor_on_the_wait() -> None:
    assert Backoff(0.1, 5.0).wait_s(1, random.Random(1), retry_after_s=30.0) == 30.0


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_s("7", now) == 7.0
    assert retry_after_s("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_s("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0  # already past
    assert retry_after_s(None) is None and retry_after_s("soon") is None and retry_after_s(" ") is None
