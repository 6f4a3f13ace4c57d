"""Where outcomes go: the output stage's plug-in seam. A writer owns the order and the guarantee; a sink owns
one destination, its transport, its retries and what makes writing twice harmless.

The two guarantees ask different things of a destination, so a sink takes one of three roles:

- `Sink` (at least once): `write` keeps at it until the destination took the whole batch, and writing an
  event again must be harmless (a crash replays the uncommitted tail). The `Writer` writes its sinks in
  order, each only after the one before took the batch, and releases the events after the last one:
  Kafka's records acknowledged, then Redis's state, then "fully written".
- `FencedSink` (exactly once, before the commit): `apply` skips every event below the fence (per input
  partition, the commit point of the last batch applied, stored with the batch in one atomic write), so a
  batch applied and then replayed is applied once; it gives up after `give_up_s`, so that a write cycle
  never keeps the consumer unpolled past its budget.
- `TransactionalSink` (exactly once, the commit): commits the records together with the input offsets
  they finish, or nothing. A commit cannot be atomic across two destinations, so a `TransactionalWriter`
  has exactly one, written last: Kafka, whose transaction carries the offsets.

A sink may hand back its batch changed: a record the destination refuses for what it is (too large,
invalid) is replaced by its dead letter, never written again for ever, and the sinks after it get the
replacement. Implementations: `sinks.kafka` (records; a transaction), `sinks.redis` (incremental state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from streamer.kafka.offsets import TP, Position
from streamer.outcomes import Outcome


class Sink(Protocol):
    """At least once: one destination, written until it took the batch."""

    @property
    def outage(self) -> bool:
        """Waiting for the destination to come back (it pauses nothing itself: the writer's backlog does)."""
        ...

    async def write(self, batch: list[Outcome]) -> list[Outcome]:
        """Write the whole batch, waiting out an outage; returns it as written (refused records replaced)."""
        ...


class FencedSink(Protocol):
    """Exactly once, before the commit: applied at most once per input offset."""

    async def apply(self, batch: list[Outcome], fence: dict[TP, int], give_up_s: float) -> bool:
        """Apply the batch, skipping events below `fence`, and move the fence up to it, atomically; False
        when the destination stayed away for `give_up_s` (the batch is tried again whole: it is idempotent)."""
        ...


@dataclass(frozen=True)
class Attempt:
    """How a transaction ended, and on an abort the batch to try next (refused records replaced)."""

    committed: bool
    batch: list[Outcome]


class TransactionalSink(Protocol):
    """Exactly once, the commit: records and the offsets they finish, in one transaction."""

    async def start(self) -> None:
        """Register with the destination, fencing an earlier instance that wrote under the same identity."""
        ...

    async def commit(self, batch: list[Outcome], positions: dict[TP, Position], group_metadata: object) -> Attempt:
        """One try at writing the batch and committing `positions` with it (KIP-447: the consumer's group
        metadata fences a member that lost its partitions)."""
        ...
