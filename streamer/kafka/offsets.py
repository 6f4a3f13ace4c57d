"""Which Kafka offsets may be committed when events finish out of order.

Events of a partition are handed out in offset order but complete in any order (they run in
batches). Committing offset N tells Kafka that everything below N is finished, so the commit point
of a partition is the lowest offset still in flight, or (last tracked + 1) once all are done.
Committing anything further would lose unfinished events on a crash or rebalance.

Pure bookkeeping: no confluent-kafka import, no I/O, O(1) amortised per event. An event may have
several parts to finish (its answer, and each window it joined): `hold` adds parts, `done` finishes
one, and the event is done when none is left. An open window thus keeps its events' offsets
uncommitted until its result is written.
"""

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

TP = tuple[str, int]
"""A topic partition as (topic, partition)."""


@dataclass
class _Partition:
    """Offsets of one partition: `pending` in order with the done prefix popped, `open` maps each
    offset not yet done to its parts left."""

    pending: deque[int] = field(default_factory=deque)
    open: dict[int, int] = field(default_factory=dict)
    last_tracked: int = -1
    committed: int | None = None

    def commit_point(self) -> int | None:
        """Lowest offset not done, or last tracked + 1; None before anything was tracked."""
        if self.pending:
            return self.pending[0]
        return self.last_tracked + 1 if self.last_tracked >= 0 else None

    def moved(self) -> int | None:
        """The commit point if it differs from what was last committed, else None."""
        point = self.commit_point()
        return point if point is not None and point != self.committed else None

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


class OffsetTracker:
    """Tracks in-flight offsets per partition and reports the safe commit points."""

    def __init__(self) -> None:
        self._parts: dict[TP, _Partition] = {}

    def track(self, tp: TP, offset: int) -> None:
        """Register an event handed out; offsets of a partition must strictly increase."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset} for {tp}")
        part = self._parts.setdefault(tp, _Partition())
        if offset <= part.last_tracked:
            raise ValueError(
                f"offsets must strictly increase per partition: {offset} after {part.last_tracked} for {tp}"
            )
        part.last_tracked = offset
        part.pending.append(offset)
        part.open[offset] = 1

    def hold(self, tp: TP, offset: int, parts: int = 1) -> bool:
        """Add parts an event must finish (e.g. the windows it joined); False if it is not in flight."""
        part = self._parts.get(tp)
        if part is None or offset not in part.open:
            return False
        part.open[offset] += parts
        return True

    def done(self, tp: TP, offset: int) -> None:
        """Finish one part of an event; once an event is done, repeated or unknown offsets (e.g. of a
        forgotten partition) are ignored."""
        part = self._parts.get(tp)
        if part is not None:
            part.finish(offset)

    def commit_points(self) -> dict[TP, int]:
        """Every tracked partition's commit point, moved or not."""
        points = {tp: part.commit_point() for tp, part in self._parts.items()}
        return {tp: point for tp, point in points.items() if point is not None}

    def committable(self) -> dict[TP, int]:
        """Offsets to commit now: only partitions whose commit point moved since `mark_committed`."""
        moved = {tp: part.moved() for tp, part in self._parts.items()}
        return {tp: point for tp, point in moved.items() if point is not None}

    def mark_committed(self, offsets: dict[TP, int]) -> None:
        """Record a successful commit so the same points are not reported again."""
        for tp, offset in offsets.items():
            part = self._parts.get(tp)
            if part is not None:
                part.committed = offset

    def forget(self, tps: Iterable[TP]) -> dict[TP, int]:
        """Drop revoked partitions; returns their final commit points where those moved, to commit now."""
        final: dict[TP, int] = {}
        for tp in tps:
            part = self._parts.pop(tp, None)
            point = part.moved() if part is not None else None
            if point is not None:
                final[tp] = point
        return final

    def in_flight(self, tp: TP | None = None) -> int:
        """Tracked-but-not-done events of one partition, or of all partitions when `tp` is None."""
        if tp is not None:
            part = self._parts.get(tp)
            return len(part.open) if part is not None else 0
        return sum(len(part.open) for part in self._parts.values())
