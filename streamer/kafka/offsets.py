"""Which Kafka offsets may be committed when events finish out of order: the pipeline's ledger.

Events of a partition are handed out in offset order but complete in any order (they run in
batches). Committing offset N tells Kafka that everything below N is finished, so the commit point
of a partition is the lowest offset still in flight, or (last tracked + 1) once all are done.
Committing anything further would lose unfinished events on a crash or rebalance.

An event may have several parts to finish (its answer, each window it joined, its late record):
`hold` adds parts, `done` finishes one, and the event is done when none is left. Every part has its
releaser written next to where it is held (see `EventHandler` and `WindowStage`).

Refs carry the assignment epoch of their partition: a partition lost and assigned back is a new
epoch, so an answer of the old incarnation, arriving after the replay tracked the same offset again,
finishes nothing of the new one (`done` ignores it).

A commit carries the partition's watermark as it stood at that point (`note`, then `Position`): the
one the event at the committed offset was placed under, or the partition's current one. The next
owner of the partition starts from it, so a replay judges every event as the first run did.

Pure bookkeeping: no confluent-kafka import, no I/O, O(1) amortised per event (notes: O(log n)).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

TP = tuple[str, int]
"""A topic partition as (topic, partition)."""


@dataclass(frozen=True, slots=True)
class Ref:
    """One event: its partition, its offset, and the assignment of the partition that handed it out."""

    tp: TP
    offset: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Position:
    """What a commit says of a partition: the next offset to read, and the partition's watermark at it."""

    offset: int
    mark_ms: int | None = None


@dataclass
class _Notes:
    """The watermark each noted event was placed under, from the last committed offset on (bisectable),
    and the partition's watermark now (what the next event will be placed under, as far as known)."""

    offsets: list[int] = field(default_factory=list)
    marks: list[int | None] = field(default_factory=list)
    now: int | None = None

    def add(self, offset: int, before_ms: int | None, after_ms: int | None) -> None:
        self.offsets.append(offset)
        self.marks.append(before_ms)
        self.advance(after_ms)

    def advance(self, mark_ms: int | None) -> None:
        if mark_ms is not None and (self.now is None or mark_ms > self.now):
            self.now = mark_ms

    def at(self, offset: int) -> int | None:
        """The watermark a replay from `offset` must start with: the one the first noted event at or
        after it was placed under, or the watermark now if none is noted yet."""
        i = bisect.bisect_left(self.offsets, offset)
        return self.marks[i] if i < len(self.offsets) else self.now

    def prune(self, offset: int) -> None:
        """Forget notes below `offset` (a committed one): replays start at or after it."""
        i = bisect.bisect_left(self.offsets, offset)
        if i:
            del self.offsets[:i], self.marks[:i]


@dataclass
class _Partition:
    """Offsets of one partition: `pending` in order with the done prefix popped, `open` maps each
    offset not yet done to its parts left."""

    epoch: int
    pending: deque[int] = field(default_factory=deque)
    open: dict[int, int] = field(default_factory=dict)
    last_tracked: int = -1
    committed: Position | None = None
    notes: _Notes = field(default_factory=_Notes)

    def commit_point(self) -> int | None:
        """Lowest offset not done, or last tracked + 1; None before anything was tracked."""
        if self.pending:
            return self.pending[0]
        return self.last_tracked + 1 if self.last_tracked >= 0 else None

    def position(self, limit: int | None) -> Position | None:
        """The commit point (held at `limit`), if it moved past what was last committed, or its watermark
        moved (an idle partition's: so a replay from here places the next events as this run does)."""
        point = self.commit_point()
        if point is not None and limit is not None:
            point = min(point, limit)
        if point is None:
            return None
        position = Position(point, self.notes.at(point))
        last = self.committed
        if last is not None and (point < last.offset or (point == last.offset and not _later(position, last))):
            return None
        return position

    def finish(self, offset: int) -> None:
        """Finish one part of an offset; when none is left pop the done prefix (amortised O(1))."""
        parts = self.open.get(offset)
        if parts is None:
            return
        if parts > 1:
            self.open[offset] = parts - 1
            return
        del self.open[offset]
        while self.pending and self.pending[0] not in self.open:
            self.pending.popleft()


def _later(position: Position, than: Position) -> bool:
    return position.mark_ms is not None and (than.mark_ms is None or position.mark_ms > than.mark_ms)


class OffsetTracker:
    """Tracks in-flight offsets per partition and reports the safe commit positions."""

    def __init__(self) -> None:
        self._parts: dict[TP, _Partition] = {}
        self._epochs: dict[TP, int] = {}

    def track(self, tp: TP, offset: int) -> Ref:
        """Register an event handed out; offsets of a partition must strictly increase."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset} for {tp}")
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = _Partition(self._epochs.get(tp, 0))
        if offset <= part.last_tracked:
            raise ValueError(
                f"offsets must strictly increase per partition: {offset} after {part.last_tracked} for {tp}"
            )
        part.last_tracked = offset
        part.pending.append(offset)
        part.open[offset] = 1
        return Ref(tp, offset, part.epoch)

    def begin(self, tp: TP, mark_ms: int | None) -> None:
        """A partition assigned with the watermark its last commit carried: commits carry it on until
        its events or its idleness move it."""
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = _Partition(self._epochs.get(tp, 0))
        part.notes.advance(mark_ms)

    def last(self, tp: TP) -> int:
        """The highest offset tracked in the partition's current assignment, -1 before any."""
        part = self._parts.get(tp)
        return part.last_tracked if part is not None else -1

    def live(self, ref: Ref) -> bool:
        """Whether the event is still in flight in the assignment that handed it out."""
        part = self._parts.get(ref.tp)
        return part is not None and part.epoch == ref.epoch and ref.offset in part.open

    def current(self, ref: Ref) -> bool:
        """Whether the ref belongs to its partition's current assignment (done or not)."""
        part = self._parts.get(ref.tp)
        return part is not None and part.epoch == ref.epoch

    def hold(self, ref: Ref, parts: int = 1) -> bool:
        """Add parts an event must finish (e.g. the windows it joined); False if it is not in flight."""
        if not self.live(ref):
            return False
        self._parts[ref.tp].open[ref.offset] += parts
        return True

    def done(self, ref: Ref) -> None:
        """Finish one part of an event; refs of another assignment, and repeated or unknown offsets
        (e.g. of a forgotten partition), are ignored."""
        part = self._parts.get(ref.tp)
        if part is not None and part.epoch == ref.epoch:
            part.finish(ref.offset)

    def note(self, ref: Ref, before_ms: int | None, after_ms: int | None) -> None:
        """The partition's watermark the event was placed under, and after it: a commit at this offset
        carries the first, one past it (with nothing noted since) the second."""
        part = self._parts.get(ref.tp)
        if part is not None and part.epoch == ref.epoch:
            part.notes.add(ref.offset, before_ms, after_ms)

    def advance(self, tp: TP, mark_ms: int | None) -> None:
        """The partition's watermark moved without an event (it went idle): commits past its last event
        carry it."""
        part = self._parts.get(tp)
        if part is not None:
            part.notes.advance(mark_ms)

    def commit_points(self) -> dict[TP, int]:
        """Every tracked partition's commit point, moved or not."""
        points = {tp: part.commit_point() for tp, part in self._parts.items()}
        return {tp: point for tp, point in points.items() if point is not None}

    def positions(self, limits: Mapping[TP, int] | None = None) -> dict[TP, Position]:
        """Positions to commit now: each partition's commit point, held at most at its limit (the first
        event of an outcome still waiting), where that moved past the last committed position."""
        limits = limits or {}
        moved = {tp: part.position(limits.get(tp)) for tp, part in self._parts.items()}
        return {tp: position for tp, position in moved.items() if position is not None}

    def mark_committed(self, positions: Mapping[TP, Position]) -> None:
        """Record a commit (sent, or done) so the same positions are not reported again."""
        for tp, position in positions.items():
            part = self._parts.get(tp)
            if part is not None:
                part.committed = position
                part.notes.prune(position.offset)

    def commit_failed(self, tps: Iterable[TP]) -> None:
        """An asynchronous commit failed: report these partitions' positions again."""
        for tp in tps:
            part = self._parts.get(tp)
            if part is not None:
                part.committed = None

    def forget(self, tps: Iterable[TP]) -> dict[TP, Position]:
        """Drop revoked partitions (their next assignment is a new epoch); returns their final positions
        where those moved, to commit now."""
        final: dict[TP, Position] = {}
        for tp in tps:
            part = self._parts.pop(tp, None)
            if part is None:
                continue
            self._epochs[tp] = part.epoch + 1
            position = part.position(None)
            if position is not None:
                final[tp] = position
        return final

    def in_flight(self, tp: TP | None = None) -> int:
        """Tracked-but-not-done events of one partition, or of all partitions when `tp` is None."""
        if tp is not None:
            part = self._parts.get(tp)
            return len(part.open) if part is not None else 0
        return sum(len(part.open) for part in self._parts.values())

    def pending(self) -> dict[TP, int]:
        """Per partition, events between the commit point and the last one tracked (memory held; metrics)."""
        return {tp: len(part.pending) for tp, part in self._parts.items()}
