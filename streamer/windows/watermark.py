"""Event-time watermarks over Kafka partitions: how far event time has surely progressed.

Each partition's watermark is the highest event time seen on it minus `allowed_lateness_ms` (the
bounded out-of-orderness, Kafka Streams' grace): events may arrive that much out of order and still
count. The consumer's watermark is the minimum over its assigned partitions, because a slow
partition may still deliver old events; a window [start, end) closes once the watermark reaches end.

A partition with no input for `idle_timeout_ms` of processing time is idle and stops holding the
watermark back, so one quiet partition cannot stall every window. A freshly assigned partition that
has had no event yet holds it back (nothing can be said while it may still deliver old events) until
it has been assigned for `idle_timeout_ms`. One assigned `unserved` (Kafka has not answered a fetch
for it yet: its consumer may be waiting for a dead member's pending transaction to resolve) is never
idle: quiet is not the same as not yet heard from, and calling it idle would turn its whole backlog late.

When every assigned partition is idle, the input has gone quiet and no event can push event time on:
the watermark then follows processing time, max(watermark so far, highest partition watermark,
now_ms), so windows whose end is in the past by the wall clock close instead of waiting forever.
Events that turn up later for those windows are late, the price of emitting final results at all.

The watermark never goes backwards: `current` returns at least what it returned before, also across
rebalances.

Per-key windows are partitioned (one set per input partition, as Kafka Streams keeps state per
task), so each partition also has a watermark of its own (`partition_marks`): its highest event time
minus the lateness while it is live, the route's `current` once it is idle. A partition that moves
to this instance then starts from its own events, not from the others' progress, so its replay is
not late; and a key's windows close as soon as its own partition has passed them. It never goes
backwards while the partition stays assigned, and starts afresh when it is assigned again.

Pure bookkeeping: processing time is passed in, no clock is read; it must be wall-clock epoch ms
(time.time(), not a monotonic clock), since the all-idle rule compares it with event time.
"""

from collections.abc import Hashable, Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class _Partition:
    """One assigned partition: its highest event time and when it last showed life (processing ms)."""

    last_seen_ms: int | None  # None: assigned without a time, the clock starts at the next call
    max_event_ms: int | None = None
    served: bool = True  # False: Kafka has not served it yet, so it cannot be idle
    mark_ms: int | None = None  # the highest of its own watermarks handed out (`partition_marks`)


class Watermarks:
    """Tracks per-partition event time and combines it into one monotonic watermark."""

    def __init__(self, allowed_lateness_ms: int, idle_timeout_ms: int) -> None:
        if allowed_lateness_ms < 0:
            raise ValueError(f"allowed_lateness_ms must be >= 0, got {allowed_lateness_ms}")
        if idle_timeout_ms <= 0:
            raise ValueError(f"idle_timeout_ms must be > 0, got {idle_timeout_ms}")
        self.allowed_lateness_ms = allowed_lateness_ms
        self.idle_timeout_ms = idle_timeout_ms
        self._parts: dict[Hashable, _Partition] = {}
        self._emitted_ms: int | None = None

    def assign(self, partitions: Iterable[Hashable], now_ms: int | None = None, *, served: bool = True) -> None:
        """Start tracking partitions; ones already assigned keep their state.

        Without `now_ms` (e.g. from a consumer callback with no clock at hand) a new partition's idle
        clock starts at the next `current` call instead. With `served=False` it starts at `serve`.
        """
        for partition in partitions:
            self._parts.setdefault(partition, _Partition(last_seen_ms=now_ms, served=served))

    def unserved(self) -> list[Hashable]:
        """Assigned partitions Kafka has not served yet."""
        return [partition for partition, part in self._parts.items() if not part.served]

    def serve(self, partitions: Iterable[Hashable], now_ms: int) -> None:
        """Kafka has served these partitions: their idle clocks start now."""
        for partition in partitions:
            if (part := self._parts.get(partition)) is not None and not part.served:
                part.served, part.last_seen_ms = True, now_ms

    def revoke(self, partitions: Iterable[Hashable]) -> None:
        """Stop tracking partitions; the watermark keeps whatever it already reached."""
        for partition in partitions:
            self._parts.pop(partition, None)

    def observe(self, partition: Hashable, event_ts_ms: int, now_ms: int) -> None:
        """Record one event; events of unassigned (e.g. just revoked) partitions are ignored."""
        part = self._parts.get(partition)
        if part is None:
            return
        part.last_seen_ms = now_ms
        part.served = True
        if part.max_event_ms is None or event_ts_ms > part.max_event_ms:
            part.max_event_ms = event_ts_ms

    def hold(self, now_ms: int, partitions: Iterable[Hashable] | None = None) -> None:
        """These partitions (all, by default) do not go idle meanwhile: the consumer is paused
        (backpressure) or cannot reach their leader (a broker outage), so their silence says nothing
        about the input.

        Without this a pause or outage longer than `idle_timeout_ms` would make the partitions idle,
        the watermark would jump to the wall clock, and the backlog waiting in Kafka would arrive late.
        """
        held = self._parts.values() if partitions is None else filter(None, map(self._parts.get, partitions))
        for part in held:
            part.last_seen_ms = now_ms

    def current(self, now_ms: int) -> int | None:
        """The watermark at processing time `now_ms`, or None while nothing can be said yet."""
        candidate = self._candidate_ms(now_ms)
        if candidate is not None and (self._emitted_ms is None or candidate > self._emitted_ms):
            self._emitted_ms = candidate
        return self._emitted_ms

    def partition_marks(self, now_ms: int) -> dict[Hashable, int | None]:
        """Each assigned partition's own watermark at `now_ms` (None while nothing can be said)."""
        route_ms = self.current(now_ms)
        marks: dict[Hashable, int | None] = {}
        for partition, part in self._parts.items():
            if self._idle(part, now_ms):
                candidate = route_ms
            else:
                candidate = None if part.max_event_ms is None else part.max_event_ms - self.allowed_lateness_ms
            if candidate is not None and (part.mark_ms is None or candidate > part.mark_ms):
                part.mark_ms = candidate
            marks[partition] = part.mark_ms
        return marks

    def idle(self, partition: Hashable, now_ms: int) -> bool:
        """Whether an assigned partition has shown no life for `idle_timeout_ms`."""
        return self._idle(self._parts[partition], now_ms)

    def _idle(self, part: _Partition, now_ms: int) -> bool:
        if not part.served:
            return False
        if part.last_seen_ms is None:
            part.last_seen_ms = now_ms  # assigned without a time: its idle clock starts now
        return now_ms - part.last_seen_ms >= self.idle_timeout_ms

    def _candidate_ms(self, now_ms: int) -> int | None:
        """The watermark the partitions justify right now, before the never-backwards rule."""
        if not self._parts:
            return None  # between rebalances: hold, do not guess
        active = [p for p in self._parts.values() if not self._idle(p, now_ms)]
        if not active:
            lateness_ms = self.allowed_lateness_ms
            marks = [p.max_event_ms - lateness_ms for p in self._parts.values() if p.max_event_ms is not None]
            return max([now_ms, *marks])
        seen = [p.max_event_ms for p in active if p.max_event_ms is not None]
        if len(seen) < len(active):
            return None  # a new partition may still deliver old events
        return min(seen) - self.allowed_lateness_ms
