"""Kafka in memory, as the pipeline sees it through its edges: an input log, a consumer group with
generations, an at-least-once sink and a transactional producer, and the output log they write to.

What is modelled, because the guarantees hinge on it:
- offsets per partition, committed offsets with their metadata, and a group generation that moves on
  every rebalance; a member that has not polled for `max_poll_interval_s` is thrown out (its
  partitions are lost at its next poll, then assigned again under a new generation);
- a poll may hand out messages of a partition that a rebalance served in the same call revoked
  (confluent-kafka-python issue 1013);
- librdkafka's local size check: `produce` refuses a record over `max_record_bytes` at once;
- commits carry the partition's watermark, and an assignment starts from the one last committed;
- at least once, a record is on the output log once its delivery is acknowledged; exactly once, a
  transaction's records and offsets become visible together when it commits, and it commits only if
  the member's generation is still the group's (KIP-447 fencing); a crash aborts it.
Deliveries and transactions wait for the simulation to settle them, so any interleaving can happen.
`SimSink` and `SimProducer` stand where `KafkaSink` and `TransactionalProducer` do: under the pipeline's
Kafka sinks (`RecordProducer`, `TransactionProducer` in streamer/pipeline/sinks/kafka.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from streamer.contracts import ErrorCode
from streamer.kafka.offsets import TP, Position
from streamer.kafka.positions import UNKNOWN, lag_of
from streamer.kafka.sink import DeliveryError
from streamer.kafka.source import Listener
from streamer.kafka.transactions import Ending, Record, Transacted
from streamer.pipeline.parse import RawMessage


@dataclass(frozen=True)
class Stored:
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None


@dataclass
class Written:
    """A record on an output topic, and whether it is visible to read_committed readers."""

    topic: str
    key: bytes | None
    value: bytes


@dataclass
class Cluster:
    """The durable side: what survives a crash of the pipeline."""

    topic: str
    partitions: int
    max_record_bytes: int
    max_poll_interval_s: float
    log: list[list[Stored]] = field(init=False)
    committed: dict[TP, int] = field(default_factory=dict)
    marks: dict[TP, int | None] = field(default_factory=dict)  # the watermark each commit carried
    out: list[Written] = field(default_factory=list)  # acknowledged / committed records, in order
    generation: int = 0
    up: bool = True  # the broker answers produce and transaction calls
    committed_hook: Callable[[], None] = lambda: None  # checks the guarantees the moment offsets commit

    def __post_init__(self) -> None:
        self.log = [[] for _ in range(self.partitions)]

    def tps(self) -> list[TP]:
        return [(self.topic, p) for p in range(self.partitions)]

    def append(self, partition: int, stored: Stored) -> int:
        self.log[partition].append(stored)
        return len(self.log[partition]) - 1

    def end(self, tp: TP) -> int:
        return len(self.log[tp[1]])

    def commit(self, positions: dict[TP, Position]) -> None:
        """Like Kafka: the last commit wins (the pipeline never commits backwards; the invariants check)."""
        for tp, position in positions.items():
            self.committed[tp] = position.offset
            self.marks[tp] = position.mark_ms
        self.committed_hook()

    def fits(self, key: bytes | None, value: bytes) -> bool:
        return len(value) + len(key or b"") <= self.max_record_bytes


@dataclass(frozen=True)
class Membership:
    generation: int


class SimSource:
    """One member's consumer: every partition of the input topic is assigned to it (a group of one),
    except while the simulation has revoked or lost some."""

    def __init__(self, cluster: Cluster, listener: Listener, now_s: Callable[[], float]) -> None:
        self._cluster = cluster
        self._listener = listener
        self._now_s = now_s
        self.paused = False
        self.assigned: set[TP] = set()
        self.position: dict[TP, int] = {}
        self.started: dict[TP, int] = {}  # the committed offset each partition was assigned at
        self.handed: set[TP] = set()  # partitions a record was handed out of since their assignment
        self.batch_limit = 500  # the simulation narrows this to vary poll batches
        self.generation = -1
        self.last_poll_s = now_s()
        self._events: list[tuple[str, list[TP]]] = [("assign", cluster.tps())]
        self.revoke_midway: list[TP] = []  # revoked inside the next poll, after its messages were fetched
        self.commits_fail = False

    # --- what the simulation does to it --------------------------------------------------------
    def rebalance(self, kind: str, tps: list[TP]) -> None:
        """Queue a rebalance event; like librdkafka, it is served inside the next poll."""
        self._events.append((kind, tps))

    def kicked(self) -> bool:
        return self._now_s() - self.last_poll_s > self._cluster.max_poll_interval_s

    # --- Source ---------------------------------------------------------------------------------
    def poll(self, max_messages: int) -> list[RawMessage]:
        if self.kicked() and self.assigned:  # max.poll.interval.ms passed: the member left the group
            self._events[:0] = [("lose", sorted(self.assigned)), ("assign", sorted(self.assigned))]
        self.last_poll_s = self._now_s()
        self._serve_events()
        messages = self._fetch(max_messages if not self.paused else 0)
        if self.revoke_midway:
            tps, self.revoke_midway = self.revoke_midway, []
            self._serve("revoke", [tp for tp in tps if tp in self.assigned])
        return messages

    def _fetch(self, max_messages: int) -> list[RawMessage]:
        messages: list[RawMessage] = []
        limit = min(max_messages, self.batch_limit)
        for tp in sorted(self.assigned):
            while len(messages) < limit and self.position[tp] < self._cluster.end(tp):
                offset = self.position[tp]
                stored = self._cluster.log[tp[1]][offset]
                messages.append(RawMessage(stored.value, stored.key, stored.timestamp_ms, tp[0], tp[1], offset))
                self.position[tp] = offset + 1
                self.handed.add(tp)
        return messages

    def _serve_events(self) -> None:
        events, self._events = self._events, []
        for kind, tps in events:
            self._serve(kind, tps)

    def _serve(self, kind: str, tps: list[TP]) -> None:
        if kind == "assign":
            fresh = [tp for tp in tps if tp not in self.assigned]
            if not fresh:
                return
            self._cluster.generation += 1
            self.generation = self._cluster.generation
            for tp in fresh:
                self.assigned.add(tp)
                self.position[tp] = self._cluster.committed.get(tp, 0)
                self.started[tp] = self.position[tp]
                self.handed.discard(tp)
            self._listener.assigned(fresh)
            for tp in fresh:
                self._listener.restored(tp, self._cluster.marks.get(tp))
            return
        gone = [tp for tp in tps if tp in self.assigned]
        if not gone:
            return
        self._cluster.generation += 1
        self.generation = self._cluster.generation
        self.assigned -= set(gone)
        if kind == "revoke":
            self._listener.revoked(gone)
        else:
            self._listener.lost(gone)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def commit(self, positions: dict[TP, Position], *, sync: bool = False) -> None:
        """Like the group coordinator: a commit of partitions the member does not own, or while it is out
        of the group, fails (and is reported, as an asynchronous commit's failure is)."""
        owned = {tp: p for tp, p in positions.items() if tp in self.assigned}
        if self.commits_fail or self.kicked():
            self._listener.commit_failed(list(positions))
            return
        self._cluster.commit(owned)

    def group_metadata(self) -> object:
        return Membership(-1 if self.kicked() else self.generation)

    def reachable(self, timeout_s: float = 1.0) -> bool:
        return self._cluster.up

    def in_group(self) -> bool:
        return not self.kicked()

    def lag(self) -> dict[TP, int]:
        """As librdkafka tells it: no position until a record of this assignment was handed out."""
        return {tp: lag_of(self.position[tp] if tp in self.handed else UNKNOWN, self.started.get(tp), 0,
                           self._cluster.end(tp)) for tp in self.assigned}

    def stalled(self) -> frozenset[TP]:
        return frozenset()

    def served(self, tps: list[TP]) -> list[TP]:
        return tps

    def close(self) -> None:
        pass


class SimSink:
    """At least once: `send` queues a delivery the simulation settles (acknowledged, or failed while
    the broker is down); an acknowledged record is on the output log."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self.pending: list[tuple[Written, asyncio.Future[None]]] = []

    def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._cluster.fits(key, value):  # librdkafka's local check, at produce()
            future.set_exception(DeliveryError(f"{topic}: Broker: Message size too large", ErrorCode.TOO_LARGE))
        else:
            self.pending.append((Written(topic, key, value), future))
        return future

    def deliver(self, count: int) -> None:
        ready, self.pending = self.pending[:count], self.pending[count:]
        for record, future in ready:
            if future.done():
                continue
            if self._cluster.up:
                self._cluster.out.append(record)
                future.set_result(None)
            else:
                future.set_exception(DeliveryError(f"{record.topic}: Local: Message timed out"))

    def poll(self) -> None:
        pass

    async def flush(self, timeout_s: float) -> int:
        return len(self.pending)

    def close(self) -> None:
        self.pending.clear()


class SimProducer:
    """Exactly once: one transaction at a time, open until the simulation ends it."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self.open: tuple[list[Record], dict[TP, Position], object, asyncio.Future[Ending]] | None = None

    async def start(self) -> None:
        return None

    async def transact(self, records: list[Record], positions: dict[TP, Position],
                       group_metadata: object) -> Transacted:
        refused = {i: ErrorCode.TOO_LARGE for i, (_, key, value) in enumerate(records)
                   if not self._cluster.fits(key, value)}
        if refused:
            await asyncio.sleep(0.01)  # produce() refused a record: the transaction is aborted
            return Transacted(Ending.ABORTED, refused)
        ending: asyncio.Future[Ending] = asyncio.get_running_loop().create_future()
        self.open = (records, positions, group_metadata, ending)
        try:
            return Transacted(await ending)
        finally:
            self.open = None

    def end(self) -> None:
        """The coordinator's answer: committed if the broker is up and the member is still current."""
        if self.open is None or self.open[3].done():
            return
        records, positions, membership, ending = self.open
        current = isinstance(membership, Membership) and membership.generation == self._cluster.generation
        if not (self._cluster.up and current):
            ending.set_result(Ending.ABORTED)
            return
        self._cluster.out.extend(Written(topic, key, value) for topic, key, value in records)
        self._cluster.commit(positions)
        ending.set_result(Ending.COMMITTED)

    def poll(self) -> None:
        pass

    async def flush(self, timeout_s: float) -> int:
        return 0

    def close(self) -> None:
        pass
