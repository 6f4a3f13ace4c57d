"""The consumer side: a consumer group that hands out messages and commits only finished work.

Polled without blocking from the event loop, so rebalance callbacks run on the loop's thread and the
OffsetTracker has a single owner. Partitions are paused as a whole when the batcher has no room.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamer.errors import StreamerError
from streamer.kafka.offsets import TP, OffsetTracker
from streamer.kafka.reachability import STATS_INTERVAL_MS, unreachable

log = logging.getLogger(__name__)


PartitionsListener = Callable[[list[TP]], None]


def _ignore(_: list[TP]) -> None:
    return None


class KafkaSource:
    def __init__(self, config: dict[str, Any], topics: Sequence[str], tracker: OffsetTracker, *,
                 on_assign: PartitionsListener = _ignore, on_revoke: PartitionsListener = _ignore,
                 commits: bool = True) -> None:
        """`on_assign`/`on_revoke` tell other stages (windows) which partitions feed them; revoked and
        lost partitions are forgotten by the tracker first, so nothing commits or waits on them.
        `commits=False` (exactly once): offsets are committed inside the producer's transactions instead."""
        self._tracker = tracker
        self._commits = commits
        self._listeners = (on_assign, on_revoke)
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

    def poll(self, max_messages: int) -> list[Message]:
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
                ready.append(message)
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

    def commit(self, *, sync: bool = False) -> None:
        """Commit every partition whose fully-written point moved."""
        offsets = self._tracker.committable() if self._commits else {}
        if offsets:
            self._commit(offsets, sync=sync)
            self._tracker.mark_committed(offsets)

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
        self.commit(sync=True)
        self._consumer.close()

    def _commit(self, offsets: dict[TP, int], *, sync: bool) -> None:
        parts = [TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()]
        try:
            self._consumer.commit(offsets=parts, asynchronous=not sync)
        except KafkaException as exc:
            log.warning("commit failed (the next commit supersedes it): %s", exc.args[0].str())

    def _on_stats(self, stats: str) -> None:
        self._unreachable = unreachable(orjson.loads(stats))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)
        if self._paused:
            consumer.pause(partitions)
        else:  # librdkafka keeps a partition's pause flag across a loss and reassignment
            consumer.resume(partitions)
        self._listeners[0]([(p.topic, p.partition) for p in partitions])
        log.info("assigned %s", _names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # In-flight events of these partitions still finish and are written (idempotently); their offsets
        # are no longer ours, so commit what is fully written now and forget the rest.
        final = self._tracker.forget((p.topic, p.partition) for p in partitions)
        if final and self._commits:
            self._commit(final, sync=True)
        self._listeners[1]([(p.topic, p.partition) for p in partitions])
        log.info("revoked %s", _names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._tracker.forget((p.topic, p.partition) for p in partitions)
        self._listeners[1]([(p.topic, p.partition) for p in partitions])
        log.warning("lost %s (another member owns them now)", _names(partitions))


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"


def _log_commit_error(error: KafkaError | None, partitions: list[TopicPartition]) -> None:
    if error is not None and error.code() != KafkaError._NO_OFFSET:
        log.warning("offset commit failed: %s", error.str())
