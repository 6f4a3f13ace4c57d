"""The consumer side: a consumer group that hands out messages; the pipeline decides what to commit.

Polled without blocking from the event loop, so rebalance callbacks run on the loop's thread and the
pipeline's ledger (the OffsetTracker) has a single owner. Partitions are paused as a whole when the
pipeline has no room. What a rebalance means for in-flight work (commit what is written, forget the
rest) is the pipeline's `Listener`'s business; this module only speaks Kafka:
- a newly assigned partition stays paused until the watermark its last commit carried is read (in a
  thread: with read_committed, a dead member's pending transaction can make that wait);
- an asynchronous commit that fails is reported, so its position is committed again.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamer.errors import StreamerError
from streamer.kafka.offsets import TP, Position
from streamer.kafka.positions import Restores, lag_of, mark_of, topic_partitions
from streamer.kafka.reachability import STATS_INTERVAL_MS, unreachable
from streamer.pipeline.parse import RawMessage

log = logging.getLogger(__name__)

_RESTORE_TIMEOUT_S = 10.0  # one try at reading committed positions; retried until it answers


class Listener(Protocol):
    """Hears, inside the poll that learns of it, of partitions coming and going and of failed commits."""

    def assigned(self, tps: list[TP]) -> None: ...

    def restored(self, tp: TP, mark_ms: int | None) -> None:
        """The watermark the partition's last commit carried (None: none), before any of its messages."""
        ...

    def revoked(self, tps: list[TP]) -> None:
        """Given to another member in an orderly rebalance: commit what is fully written now."""
        ...

    def lost(self, tps: list[TP]) -> None:
        """Taken without a handover (session timeout): another member may own them already."""
        ...

    def commit_failed(self, tps: list[TP]) -> None:
        """An asynchronous commit of these partitions failed: commit their positions again."""
        ...


class Source(Protocol):
    """Where a pipeline's events come from: a consumer group's share of the input topics."""

    @property
    def paused(self) -> bool: ...

    def poll(self, max_messages: int) -> list[RawMessage]: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def commit(self, positions: dict[TP, Position], *, sync: bool = False) -> None: ...

    def group_metadata(self) -> object: ...

    def reachable(self, timeout_s: float = 1.0) -> bool: ...

    def in_group(self) -> bool: ...

    def lag(self) -> dict[TP, int]: ...

    def stalled(self) -> frozenset[TP]: ...

    def served(self, tps: list[TP]) -> list[TP]: ...

    def close(self) -> None: ...


class KafkaSource:
    def __init__(self, config: dict[str, Any], topics: Sequence[str], listener: Listener) -> None:
        self._listener = listener
        self._paused = False
        self._restoring = Restores()  # assigned, paused until their committed watermark is read
        self._restored: queue.SimpleQueue[tuple[TP, int, int, int | None]] = queue.SimpleQueue()
        self._committed: dict[TP, int] = {}  # where each assigned partition started (its committed offset)
        self._unreachable: frozenset[TP] = frozenset()
        self._group_state = "init"
        self._consumer = Consumer({"statistics.interval.ms": STATS_INTERVAL_MS, **config,
                                   "on_commit": self._on_commit, "stats_cb": self._on_stats})
        self._consumer.subscribe(
            list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    @property
    def paused(self) -> bool:
        return self._paused

    def poll(self, max_messages: int) -> list[RawMessage]:
        """Up to `max_messages` ready messages of owned partitions, without waiting; broker hiccups are
        logged, fatal errors raise."""
        self._finish_restores()
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
        return [_raw(m) for m in ready]

    def pause(self) -> None:
        if not self._paused:
            self._consumer.pause(self._consumer.assignment())
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._consumer.resume([tp for tp in self._consumer.assignment()
                                   if (tp.topic, tp.partition) not in self._restoring.pending()])
            self._paused = False

    def commit(self, positions: dict[TP, Position], *, sync: bool = False) -> None:
        """Commit these positions (the next offset to read, and the watermark, per partition); a failure
        is reported to the listener, which commits the partitions again."""
        try:
            self._consumer.commit(offsets=topic_partitions(positions), asynchronous=not sync)
        except KafkaException as exc:
            log.warning("commit failed (it is tried again): %s", exc.args[0].str())
            self._listener.commit_failed(list(positions))

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

    def in_group(self) -> bool:
        """Whether the member is joined to its group (as of the client's last statistics)."""
        return self._group_state == "up"

    def lag(self) -> dict[TP, int]:
        """Messages not handed out yet per assigned partition, from the client's cached watermarks
        (`lag_of`). The position steps over transaction markers and aborted records (librdkafka 2.16,
        measured), so a caught-up partition of a transactional topic shows 0, as the window stages
        (and the stall check) rely on."""
        lags: dict[TP, int] = {}
        for position in self._consumer.position(self._consumer.assignment()):
            low, high = self._consumer.get_watermark_offsets(position, cached=True)
            tp = (position.topic, position.partition)
            lags[tp] = lag_of(position.offset, self._committed.get(tp), low, high)
        return lags

    def stalled(self) -> frozenset[TP]:
        """Owned partitions not fetched now though their input may wait: their leader is unreachable
        (as of the client's last statistics) or their committed watermark is still being read. Their
        silence says nothing about the input."""
        return self._unreachable | self._restoring.pending()

    def served(self, tps: list[TP]) -> list[TP]:
        """Of `tps`, the partitions Kafka has answered a fetch for (their end offset is known here)."""
        return [tp for tp in tps if self._consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)[1] >= 0]

    def close(self) -> None:
        self._consumer.close()

    def _on_stats(self, stats: str) -> None:
        document = orjson.loads(stats)
        self._unreachable = unreachable(document)
        self._group_state = document.get("cgrp", {}).get("state", self._group_state)

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = [(p.topic, p.partition) for p in partitions if p.error is not None]
        if error is not None and error.code() != KafkaError._NO_OFFSET:
            log.warning("offset commit failed (it is tried again): %s", error.str())
            failed = [(p.topic, p.partition) for p in partitions]
        if failed:
            self._listener.commit_failed(failed)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)
        consumer.pause(partitions)  # until the watermark its last commit carried is read
        tps = _tps(partitions)
        ticket = self._restoring.begin(tps)
        self._listener.assigned(tps)
        threading.Thread(target=self._read_commits, args=(tps, ticket), daemon=True, name="read-commits").start()
        log.info("assigned %s", _names(partitions))

    def _read_commits(self, tps: list[TP], ticket: int) -> None:
        """In a thread: the positions committed for `tps`, with their watermarks, retried until read."""
        while True:
            try:
                committed = self._consumer.committed([TopicPartition(*tp) for tp in tps], timeout=_RESTORE_TIMEOUT_S)
            except (KafkaException, RuntimeError) as exc:  # RuntimeError: the consumer was closed meanwhile
                if isinstance(exc, RuntimeError):
                    return
                log.warning("reading committed positions of %s: %s; trying again", tps, exc.args[0].str())
                continue
            for position in committed:
                self._restored.put(((position.topic, position.partition), ticket, position.offset,
                                    mark_of(position.metadata)))
            return

    def _finish_restores(self) -> None:
        """On the loop's thread: hand each restored watermark to the listener and start fetching."""
        while not self._restored.empty():
            tp, ticket, committed, mark_ms = self._restored.get()
            if not self._restoring.finish(tp, ticket):
                continue  # revoked meanwhile, or read for an earlier assignment of it
            self._committed[tp] = committed
            self._listener.restored(tp, mark_ms)
            if not self._paused:
                self._consumer.resume([TopicPartition(*tp)])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._disown(partitions)
        self._listener.revoked(_tps(partitions))
        log.info("revoked %s", _names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._disown(partitions)
        self._listener.lost(_tps(partitions))
        log.warning("lost %s (another member owns them now)", _names(partitions))

    def _disown(self, partitions: list[TopicPartition]) -> None:
        self._restoring.cancel(_tps(partitions))
        for tp in _tps(partitions):
            self._committed.pop(tp, None)


def _raw(message: Message) -> RawMessage:
    ts_type, ts_ms = message.timestamp()
    # No timestamp, or a negative one (a producer may set -1 explicitly): processing time stands in.
    known = ts_type != TIMESTAMP_NOT_AVAILABLE and ts_ms >= 0
    return RawMessage(message.value(), message.key(), ts_ms if known else None,
                      message.topic(), message.partition(), message.offset())


def _tps(partitions: list[TopicPartition]) -> list[TP]:
    return [(p.topic, p.partition) for p in partitions]


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"
