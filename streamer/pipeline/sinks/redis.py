"""Redis as a sink: each outcome's incremental state (`streamer.state.redis`), a batch in one pipeline.

Writing twice is harmless by construction: each event's script first claims a guard key (at least once, a
`Sink`), and exactly once the batch also checks and moves the fence in the same MULTI (a `FencedSink`).
Redis away is backed off (`streamer.state.retry`): for ever at least once, within the cycle's budget
exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from streamer.contracts import Answer, WindowResult
from streamer.kafka.offsets import TP
from streamer.outcomes import Outcome
from streamer.state.redis import StateUnavailable, Written
from streamer.state.retry import retrying


class State(Protocol):
    """Where outcomes' incremental state goes (`streamer.state.redis.RedisState`)."""

    async def write(self, outcomes: Sequence[Written], fence: dict[TP, int] | None = None) -> int: ...


class RedisOutcomes:
    """Both a `Sink` (guarded per event) and a `FencedSink` (guarded per event and by the fence)."""

    def __init__(self, state: State) -> None:
        self._state = state
        self.outage = False  # backing off while Redis is away

    async def write(self, batch: list[Outcome]) -> list[Outcome]:
        await retrying("redis write", lambda: self._state.write(_written(batch)), waiting=self._waiting)
        return batch

    async def apply(self, batch: list[Outcome], fence: dict[TP, int], give_up_s: float) -> bool:
        try:
            await retrying("redis write", lambda: self._state.write(_written(batch), fence=fence), give_up_s=give_up_s)
        except StateUnavailable:
            return False
        return True

    def _waiting(self, waiting: bool) -> None:
        self.outage = waiting


def _written(batch: list[Outcome]) -> list[Written]:
    return [Written(o.record, o.payload, _key_text(o), o.route, o.digest) for o in batch]


def _key_text(outcome: Outcome) -> str | None:
    record = outcome.record
    if isinstance(record, Answer | WindowResult):
        return record.key
    return outcome.kafka_key.decode("utf-8", "replace") if outcome.kafka_key else None
