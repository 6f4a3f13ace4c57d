"""Commit positions as Kafka sees them: the offset, and the partition's watermark in the commit metadata.

The watermark travels with the offset (as Kafka Streams keeps its partition time in commit metadata),
so the next owner of a partition, this process after a restart included, places the replayed events
under the watermark the first run placed them under. Metadata of other writers is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from confluent_kafka import TopicPartition

from streamer.kafka.offsets import TP, Position

_PREFIX = "streamer:wm="


def topic_partitions(positions: Mapping[TP, Position]) -> list[TopicPartition]:
    return [_topic_partition(topic, partition, position) for (topic, partition), position in positions.items()]


def _topic_partition(topic: str, partition: int, position: Position) -> TopicPartition:
    if position.mark_ms is None:
        return TopicPartition(topic, partition, position.offset)
    return TopicPartition(topic, partition, position.offset, metadata=f"{_PREFIX}{position.mark_ms}")


def mark_of(metadata: str | None) -> int | None:
    """The watermark a commit carried, or None (no metadata, or someone else's)."""
    if not metadata or not metadata.startswith(_PREFIX):
        return None
    try:
        return int(metadata.removeprefix(_PREFIX))
    except ValueError:
        return None


class Restores:
    """Partitions whose committed watermark is still being read, one ticket per assignment.

    A partition lost and assigned again while the first read was under way gets a new ticket, so the
    answer of the earlier read, which may predate the other owner's commits, cannot stand for the
    one the replay starts from: only the read of the current assignment finishes it."""

    def __init__(self) -> None:
        self._tickets: dict[TP, int] = {}
        self._issued = 0

    def begin(self, tps: Iterable[TP]) -> int:
        self._issued += 1
        for tp in tps:
            self._tickets[tp] = self._issued
        return self._issued

    def cancel(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._tickets.pop(tp, None)

    def finish(self, tp: TP, ticket: int) -> bool:
        """Whether this answer finishes the partition's restore (False: revoked, or an earlier assignment's)."""
        if self._tickets.get(tp) != ticket:
            return False
        del self._tickets[tp]
        return True

    def pending(self) -> frozenset[TP]:
        return frozenset(self._tickets)


UNKNOWN = -1001
"""librdkafka's OFFSET_INVALID: a position not known yet."""


def lag_of(position: int, committed: int | None, low: int, high: int) -> int:
    """Records of a partition not handed out yet, from the client's cached end offset (`high`, -1
    before the first fetch: 0 then). librdkafka reports no position until a record of the current
    assignment was handed out, so before that the partition starts at its committed offset (or, with
    none, at the log start: `auto.offset.reset` is earliest). The log start alone would count every
    record ever consumed of a quiet partition, after each restart or rebalance, as waiting."""
    if high < 0:
        return 0
    if position >= 0:
        start = position
    elif committed is not None and committed >= 0:
        start = committed
    else:
        start = max(low, 0)
    return max(high - start, 0)
