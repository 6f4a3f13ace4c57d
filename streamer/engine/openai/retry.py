"""What a failed call means, and how long to wait before the next try.

The classes decide everything the backend does about a failure: whether to try again, whether it speaks
of the server being away (the circuit) or of too much load (the concurrency limit), and which dead-letter
code a request gets when trying again cannot help.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum


class Failure(StrEnum):
    TIMEOUT = "timeout"  # no answer, a silence longer than the read timeout, or a proxy's 408
    CONNECTION = "connection"  # refused, reset, or closed mid-answer
    SERVER = "server_error"  # 5xx other than 503
    OVERLOADED = "overloaded"  # 429, 503 or 425: the server is there and asks for less, or later
    AUTH = "auth"  # 401/403: the key is wrong (or was revoked)
    CONTEXT = "context_too_long"  # 400: the prompt is longer than the model's context
    REJECTED = "rejected"  # any other 4xx: this request is wrong for this server

    @property
    def retried(self) -> bool:
        """Trying again can help: the server was away, broken for a while, or busy."""
        return self not in (Failure.CONTEXT, Failure.REJECTED)

    @property
    def server_away(self) -> bool:
        """It counts towards opening the circuit (a 429/503 answer shows the server is there)."""
        return self in (Failure.TIMEOUT, Failure.CONNECTION, Failure.SERVER, Failure.AUTH)


# llama.cpp: 400 exceed_context_size_error "exceeds the available context size"; vLLM: 400 "This model's
# maximum context length is N tokens"; OpenAI: code context_length_exceeded; TGI: 422 "Input validation error:
# `inputs` tokens + `max_new_tokens` must be <= N" or "`inputs` must have less than N tokens".
_CONTEXT_MARKS = ("exceed_context_size", "context size", "context length", "context_length", "context window",
                  "`max_new_tokens` must be <=", "`inputs` must have less than")
# A Retry-After is honoured up to this many times retry_max_s: a server (or a proxy) asking for hours would
# otherwise hold its requests, and with the circuit closed nothing else would notice.
RETRY_AFTER_CAP = 6


def classify_status(status: int, body: str) -> Failure:
    """The class of an HTTP error answer (status >= 400) from its status and body."""
    if status in (425, 429, 503):
        return Failure.OVERLOADED
    if status == 408:  # a proxy or load balancer gave up waiting for the server
        return Failure.TIMEOUT
    if status >= 500:
        return Failure.SERVER
    if status in (401, 403):
        return Failure.AUTH
    lowered = body.lower()
    if status in (400, 413, 422) and any(mark in lowered for mark in _CONTEXT_MARKS):
        return Failure.CONTEXT
    return Failure.REJECTED


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: a random wait between half and all of base * 2**(attempt - 1), capped,
    so requests that failed together do not all come back together."""

    base_s: float
    cap_s: float

    def wait_s(self, attempt: int, rng: random.Random, retry_after_s: float | None = None) -> float:
        """The wait before try `attempt + 1` (attempt counts failures so far, from 1); a server's Retry-After
        is a floor, itself capped at RETRY_AFTER_CAP times `cap_s`."""
        ceiling = min(self.cap_s, self.base_s * 2 ** min(attempt - 1, 30))
        asked = min(retry_after_s or 0.0, self.cap_s * RETRY_AFTER_CAP)
        return max(rng.uniform(ceiling / 2, ceiling), asked)


def retry_after_s(header: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header in seconds: delay-seconds or an HTTP-date; None when absent or unreadable."""
    if header is None or not header.strip():
        return None
    value = header.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
