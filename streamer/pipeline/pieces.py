"""The pieces of streaming answers waiting to be written, coalesced per event: pure, no I/O, no clock.

The model hands out a piece per token; writing each would be a Redis round trip and a Kafka record per
token. Instead an event's pieces join into one pending delta until the next flush takes it, so however
slow the writes, an event has at most one delta waiting and the text waiting is at most what the model
generated since the last flush. `max_chars` bounds that text across events: a piece past it is dropped,
and so is the rest of that event's text (its deltas would no longer join), and its final marker skips a
sequence number, so a reader sees the gap where text is missing (the final answer, written as ever, is
authoritative).

Per event the deltas taken have sequence numbers 0, 1, 2, ... (a gap where text is missing), the last
one, and only it, is final, and they join to the pieces taken in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Delta:
    """One write of an event's progress: the text since its previous delta."""

    id: str  # the event's
    route: str
    key: str | None  # the event key, as in its answer
    record_key: bytes | None  # the Kafka message key (the event key, else the input record's)
    seq: int
    delta: str
    final: bool
    first: bool  # this event's first delta in this process (a replay's restarts the event's Redis stream)
    error: str | None = None  # final: the dead letter's code when the event ended without an answer


@dataclass
class _Open:
    id: str
    route: str
    key: str | None
    record_key: bytes | None
    pending: list[str] = field(default_factory=list)
    chars: int = 0
    seq: int = 0  # the next delta's
    lost: bool = False  # a piece was dropped: the rest of the text is too
    started: bool = False  # a delta was taken
    final: bool = False
    error: str | None = None


class PieceBuffer:
    """Open events by handle; `take` empties it into at most one delta per event."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.chars = 0  # text waiting, all events together
        self._open: dict[int, _Open] = {}
        self._handles = itertools.count()

    def __len__(self) -> int:
        """Events open: streaming, or finished with their final delta not taken yet."""
        return len(self._open)

    def open(self, event_id: str, route: str, key: str | None, record_key: bytes | None) -> int:
        """Start an event's answer; its handle (events may share an id: a producer's duplicate)."""
        handle = next(self._handles)
        self._open[handle] = _Open(event_id, route, key, record_key)
        return handle

    def add(self, handle: int, piece: str) -> bool:
        """Queue a piece of the event's text; False when dropped (the buffer is full, or was for an earlier
        piece of the event, or the event finished)."""
        entry = self._open.get(handle)
        if entry is None or entry.final or entry.lost:
            return False
        if self.chars + len(piece) > self.max_chars:
            entry.lost = True
            return False
        entry.pending.append(piece)
        entry.chars += len(piece)
        self.chars += len(piece)
        return True

    def finish(self, handle: int, error: str | None = None) -> None:
        """The event's answer (or, with `error`, its dead letter) is made: its next delta is its last. The
        first end counts."""
        if (entry := self._open.get(handle)) is not None and not entry.final:
            entry.final, entry.error = True, error

    def take(self) -> list[Delta]:
        """Every event's pending text as one delta each, and finished events' final markers (in the same
        delta where nothing is missing); the finished events are forgotten."""
        deltas: list[Delta] = []
        for handle, entry in list(self._open.items()):
            ended = False  # its final marker is written
            if entry.pending:
                ended = entry.final and not entry.lost
                deltas.append(self._delta(entry, "".join(entry.pending), final=ended))
                self.chars -= entry.chars
                entry.pending, entry.chars = [], 0
            if entry.final:
                if not ended:
                    entry.seq += int(entry.lost)  # the gap where the dropped text was
                    deltas.append(self._delta(entry, "", final=True))
                del self._open[handle]
        return deltas

    @staticmethod
    def _delta(entry: _Open, text: str, *, final: bool) -> Delta:
        delta = Delta(entry.id, entry.route, entry.key, entry.record_key, entry.seq, text, final,
                      first=not entry.started, error=entry.error if final else None)
        entry.seq, entry.started = entry.seq + 1, True
        return delta
