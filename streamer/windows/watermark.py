"""Event-time watermarks over Kafka partitions: how far event time has surely progressed.

Each partition's watermark advances per record, in record order (Kafka Streams' stream time): the
record is placed under the watermark its predecessors set, `observe` returns it and then moves it to
the record's event time minus `allowed_lateness_ms` (the bounded out-of-orderness, Kafka Streams'
grace) if that is higher. So a backlog, a replay and a live stream place every record alike, however
they are batched. A partition assigned again starts from the watermark its last commit carried
(`restore`), so a replay after a crash or rebalance judges each record as the first run did.

Wall-clock rules, the only ones that depend on timing:
- A partition fetched without a record for `idle_timeout_ms` of processing time is idle: its
  watermark follows the route's (below), so windows of a quiet partition close. Only time the
  partition was fetched counts: while it is `hold`-ed (the consumer paused by backpressure, its leader
  unreachable, its position still being read) its idle time stands still, and resumes afterwards.
  A partition Kafka has not served yet is never idle (quiet is not the same as not yet heard from),
  nor is one whose records are known to wait (`waiting`): a throttled consumer hands out one
  partition's fetched backlog before another's, and a stalled process finds records on its return.
- The route's watermark (`current`) is the minimum over its partitions that are not idle; while one
  of them has had no record yet, nothing can be said (None).
- When every assigned partition is idle, the input has gone quiet: the route's watermark follows
  processing time, max(its partitions' watermarks, now - allowed_lateness_ms), so windows whose end
  is in the past by the wall clock close. Records that turn up later for those windows are late.
Watermarks never go backwards while assigned; the route's never goes backwards at all.

Pure bookkeeping: processing time is passed in, no clock is read; it must be wall-clock epoch ms
(time.time(), not a monotonic clock), since the all-idle rule compares it with event time.
"""

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar


@dataclass(slots=True)
class _Partition:
    """One assigned partition."""

    seen_ms: int | None  # processing time of the last record or clock reading; None: the next reading
    served: bool = True  # False: Kafka has not served it yet, so it cannot be idle
    mark_ms: int | None = None  # its watermark: restored, from its records, or advanced while idle
    idle_ms: int = 0  # processing time it was fetched without a record
    held: bool = False  # not fetched since the last `hold` (idle time stands still)


P = TypeVar("P", bound=Hashable)  # a partition's identity (TP in the service)


class Watermarks(Generic[P]):
    """Per-partition watermarks, advanced per record, combined into one monotonic route watermark."""

    def __init__(self, allowed_lateness_ms: int, idle_timeout_ms: int) -> None:
        if allowed_lateness_ms < 0:
            raise ValueError(f"allowed_lateness_ms must be >= 0, got {allowed_lateness_ms}")
        if idle_timeout_ms <= 0:
            raise ValueError(f"idle_timeout_ms must be > 0, got {idle_timeout_ms}")
        self.allowed_lateness_ms = allowed_lateness_ms
        self.idle_timeout_ms = idle_timeout_ms
        self._parts: dict[P, _Partition] = {}
        self._emitted_ms: int | None = None

    def assign(self, partitions: Iterable[P], now_ms: int | None = None, *, served: bool = True) -> None:
        """Start tracking partitions; ones already assigned keep their state.

        Without `now_ms` (e.g. from a consumer callback with no clock at hand) a new partition's idle
        clock starts at the next reading. With `served=False` it starts at `serve`.
        """
        for partition in partitions:
            self._parts.setdefault(partition, _Partition(seen_ms=now_ms, served=served))

    def restore(self, partition: P, mark_ms: int | None) -> None:
        """The watermark the partition's last commit carried: its records continue from there."""
        part = self._parts.get(partition)
        if part is not None and mark_ms is not None and (part.mark_ms is None or mark_ms > part.mark_ms):
            part.mark_ms = mark_ms

    def unserved(self) -> list[P]:
        """Assigned partitions Kafka has not served yet."""
        return [partition for partition, part in self._parts.items() if not part.served]

    def serve(self, partitions: Iterable[P], now_ms: int) -> None:
        """Kafka has served these partitions: their idle clocks start now."""
        for partition in partitions:
            if (part := self._parts.get(partition)) is not None and not part.served:
                part.served, part.seen_ms, part.idle_ms = True, now_ms, 0

    def revoke(self, partitions: Iterable[P]) -> None:
        """Stop tracking partitions; the route's watermark keeps whatever it already reached."""
        for partition in partitions:
            self._parts.pop(partition, None)

    def assigned(self, partition: P) -> bool:
        return partition in self._parts

    def observe(self, partition: P, event_ts_ms: int, now_ms: int) -> int | None:
        """Record one event; returns its partition's watermark before it (the one the event is placed
        under, None while nothing can be said), then advances it. A straggler of a partition no longer
        assigned changes nothing."""
        part = self._parts.get(partition)
        if part is None:
            return None
        before = part.mark_ms
        candidate = event_ts_ms - self.allowed_lateness_ms
        if before is None or candidate > before:
            part.mark_ms = candidate
        part.seen_ms, part.served, part.idle_ms = now_ms, True, 0
        return before

    def mark(self, partition: P) -> int | None:
        """A partition's watermark now (what a commit at this point carries)."""
        part = self._parts.get(partition)
        return part.mark_ms if part is not None else None

    def hold(self, now_ms: int, partitions: Iterable[P] | None = None) -> None:
        """From now on, until the next `hold`, these partitions (all, by default; none with an empty
        list) are not fetched: the consumer is paused (backpressure), their leader is unreachable (a
        broker outage) or their position is still being read, so their silence says nothing about the
        input and their idle time stands still.

        Without this a pause or outage longer than `idle_timeout_ms` would make the partitions idle, the
        watermark would jump to the wall clock, and the backlog waiting in Kafka would arrive late.
        """
        self._read_clock(now_ms)
        held = set(self._parts) if partitions is None else set(partitions)
        for partition, part in self._parts.items():
            part.held = partition in held

    def waiting(self, partitions: Iterable[P]) -> None:
        """Kafka holds records of these partitions that were not handed out yet: they are not quiet,
        whatever the time since their last record, so their idle time starts again (as a record would
        restart it). Without this their waiting records would be judged against the route's watermark."""
        for partition in partitions:
            if (part := self._parts.get(partition)) is not None:
                part.idle_ms = 0

    def current(self, now_ms: int) -> int | None:
        """The route's watermark at processing time `now_ms`, or None while nothing can be said yet."""
        self._read_clock(now_ms)
        candidate = self._candidate_ms(now_ms)
        if candidate is not None and (self._emitted_ms is None or candidate > self._emitted_ms):
            self._emitted_ms = candidate
        if self._emitted_ms is not None:  # idle partitions follow the route
            for part in self._parts.values():
                if self._idle(part) and (part.mark_ms is None or part.mark_ms < self._emitted_ms):
                    part.mark_ms = self._emitted_ms
        return self._emitted_ms

    def partition_marks(self, now_ms: int) -> dict[P, int | None]:
        """Each assigned partition's own watermark at `now_ms` (None while nothing can be said)."""
        self.current(now_ms)
        return {partition: part.mark_ms for partition, part in self._parts.items()}

    def idle(self, partition: P, now_ms: int) -> bool:
        """Whether an assigned partition has been fetched without a record for `idle_timeout_ms`."""
        self._read_clock(now_ms)
        return self._idle(self._parts[partition])

    def _read_clock(self, now_ms: int) -> None:
        """Count the processing time since the last reading as idle time, for partitions fetched meanwhile."""
        for part in self._parts.values():
            if part.seen_ms is not None and part.served and not part.held and now_ms > part.seen_ms:
                part.idle_ms += now_ms - part.seen_ms
            if part.seen_ms is None or now_ms > part.seen_ms:
                part.seen_ms = now_ms

    def _idle(self, part: _Partition) -> bool:
        return part.served and part.idle_ms >= self.idle_timeout_ms

    def _candidate_ms(self, now_ms: int) -> int | None:
        """The watermark the partitions justify right now, before the never-backwards rule."""
        if not self._parts:
            return None  # between rebalances: hold, do not guess
        active = [p for p in self._parts.values() if not self._idle(p)]
        if not active:
            marks = [p.mark_ms for p in self._parts.values() if p.mark_ms is not None]
            return max([now_ms - self.allowed_lateness_ms, *marks])
        marks = [p.mark_ms for p in active if p.mark_ms is not None]
        if len(marks) < len(active):
            return None  # a partition may still deliver old events
        return min(marks)
