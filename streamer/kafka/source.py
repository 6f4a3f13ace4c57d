"""The consumer side: a consumer group that hands out messages; the pipeline decides what to commit.

Polled without blocking from the event loop, so rebalance callbacks run on the loop's thread and the
pipeline's ledger (the OffsetTracker) has a single owner. Partitions are paused as a whole when the
pipeline has no room. What a rebalance means for in-flight work (commit what is written, forget the
rest) is the pipeline's `Rebalance` listener's business; this module only speaks Kafka.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamer.decode import RawMessage
from streamer.errors import StreamerError
from streamer.kafka.offsets import TP
from streamer.kafka.reachability import STATS_INTERVAL_MS, unreachable

log = logging.getLogger(__name__)


class Rebalance(Protocol):
    """Hears of partitions coming and going, inside the poll that learns of it."""

    def assigned(self, tps: list[TP]) -> None: ...

    def revoked(self, tps: list[TP]) -> None:
        """Given to another member in an orderly rebalance: commit what is fully written now."""
        ...

    def lost(self, tps: list[TP]) -> None:
        """Taken without a handover (session timeout): another member may own them already."""
        ...


class Source(Protocol):
    """Where a pipeline's events come from: a consumer group's share of the input topics."""

    @property
    def paused(self) -> bool: ...

    def poll(self, max_messages: int) -> list[RawMessage]: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def commit(self, offsets: dict[TP, int], *, sync: bool = False) -> None: ...

    def group_metadata(self) -> object: ...

    def reachable(self, timeout_s: float = 1.0) -> bool: ...

    def lag(self) -> dict[TP, int]: ...

    def unreachable(self) -> frozenset[TP]: ...

    def served(self, tps: list[TP]) -> list[TP]: ...

    def close(self) -> None: ...


class KafkaSource:
    def __init__(self, config: dict[str, Any], topics: Sequence[str], rebalance: Rebalance) -> None:
        self._rebalance = rebalance
        self._paused = False
        self._unreachable: frozenset[TP] = frozenset()
        self._consumer = Consumer({"statistics.interval.ms": STATS_INTERVAL_MS, **config,
                                   "on_commit": _log_commit_error, "stats_cb": self._on_stats})
        self._consumer.subscribe(
            list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    @property
    def paused(self) -> bool:
        return self._paused

    def poll(self, max_messages: int) -> list[RawMessage]:
        """Up to `max_messages` ready messages, without waiting; broker hiccups are logged, fatal errors raise."""
        if max_messages <= 0:
            if not self._paused:
                return []  # no room; polling again would hand out more than we can hold
            # Paused partitions hand out nothing, but polling still serves rebalances and the group
            # session: a long pause (Redis or Kafka away) must not leave a revoke unheard.
            max_messages = 1
        ready = []
        for message in self._consumer.consume(num_messages=max_messages, timeout=0):
            error = message.error()
            if error is None:
                ready.append(_raw(message))
            elif error.fatal():
                raise StreamerError(f"Kafka consumer failed: {error.str()}")
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer: %s", error.str())
        return ready

    def pause(self) -> None:
        if not self._paused:
            self._consumer.pause(self._consumer.assignment())
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._consumer.resume(self._consumer.assignment())
            self._paused = False

    def commit(self, offsets: dict[TP, int], *, sync: bool = False) -> None:
        """Commit these offsets (the next one to read, per partition); a failure is logged, and the next
        commit supersedes it."""
        parts = [TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()]
        try:
            self._consumer.commit(offsets=parts, asynchronous=not sync)
        except KafkaException as exc:
            log.warning("commit failed (the next commit supersedes it): %s", exc.args[0].str())

    def group_metadata(self) -> object:
        """The member's generation, which a transaction's offset commit must carry (KIP-447 fencing)."""
        return self._consumer.consumer_group_metadata()

    def reachable(self, timeout_s: float = 1.0) -> bool:
        """Whether the cluster answers a metadata request (blocking: call it from a thread)."""
        try:
            self._consumer.list_topics(timeout=timeout_s)
        except KafkaException:
            return False
        return True

    def lag(self) -> dict[TP, int]:
        """Messages behind the log end per assigned partition, from the client's cached watermarks
        (before the first fetch of a partition: from its log start; 0 while nothing is known)."""
        lags: dict[TP, int] = {}
        for position in self._consumer.position(self._consumer.assignment()):
            low, high = self._consumer.get_watermark_offsets(position, cached=True)
            start = position.offset if position.offset >= 0 else max(low, 0)
            lags[(position.topic, position.partition)] = max(high - start, 0) if high >= 0 else 0
        return lags

    def unreachable(self) -> frozenset[TP]:
        """Partitions whose leader the client cannot reach (as of its last statistics): their silence
        is an outage, not quiet input."""
        return self._unreachable

    def served(self, tps: list[TP]) -> list[TP]:
        """Of `tps`, the partitions Kafka has answered a fetch for (their end offset is known here)."""
        return [tp for tp in tps if self._consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)[1] >= 0]

    def close(self) -> None:
        self._consumer.close()

    def _on_stats(self, stats: str) -> None:
        self._unreachable = unreachable(orjson.loads(stats))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)
        if self._paused:
            consumer.pause(partitions)
        else:  # librdkafka keeps a partition's pause flag across a loss and reassignment
            consumer.resume(partitions)
        self._rebalance.assigned(_tps(partitions))
        log.info("assigned %s", _names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._rebalance.revoked(_tps(partitions))
        log.info("revoked %s", _names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._rebalance.lost(_tps(partitions))
        log.warning("lost %s (another member owns them now)", _names(partitions))


def _raw(message: Message) -> RawMessage:
    ts_type, ts_ms = message.timestamp()
    return RawMessage(message.value(), message.key(), None if ts_type == TIMESTAMP_NOT_AVAILABLE else ts_ms,
                      message.topic(), message.partition(), message.offset())


def _tps(partitions: list[TopicPartition]) -> list[TP]:
    return [(p.topic, p.partition) for p in partitions]


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"


def _log_commit_error(error: KafkaError | None, partitions: list[TopicPartition]) -> None:
    if error is not None and error.code() != KafkaError._NO_OFFSET:
        log.warning("offset commit failed: %s", error.str())
