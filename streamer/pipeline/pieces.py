"""The pieces of streaming answers waiting to be written, coalesced per event: pure, no I/O, no clock.

The model hands out a piece per token; writing each would be a Redis round trip and a Kafka record per
token. Instead an event's pieces join into one pending delta until the next flush takes it, so however
slow the writes, an event has at most one delta waiting and the text waiting is at most what the model
generated since the last flush. `max_chars` bounds that text across events: a piece past it is dropped,
and so is the rest of that event's text (its deltas would no longer join), and its final marker skips a
sequence number, so a reader sees the gap where text is missing (the final answer, written as ever, is
authoritative).

Per event the deltas taken have sequence numbers 0, 1, 2, ... (a gap where text is missing), the last
one, and only it, is final, and they join to the pieces taken in. Each opening of an event is a run with its
own token (`run`), which every delta carries: where a run's deltas land (`partial:{route}:{id}` in Redis) an
entry of another run is replaced, not appended to, so two runs of an event never mix there however their writes
fare. A route's id has one run open at a time: opening one already open (a replay in the same process while the
earlier assignment's request still streams, or a producer's duplicate) retires the older run, whose pieces
and final marker are dropped from then on (`superseded`). Two routes may see one id (one event sent to both):
their runs are apart.
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
    first: bool  # this run's first delta taken
    error: str | None = None  # final: the dead letter's code when the event ended without an answer
    run: str = ""  # the run's token: unique per opening of an event (per process, with the buffer's prefix)


@dataclass
class _Open:
    run: str
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
    retired: bool = False  # a newer run of the id is open: this one's pieces and marker are dropped


BUFFER = "buffer"
"""Why `add` drops a piece: the buffer is full (or was, for an earlier piece of the event)."""
SUPERSEDED = "superseded"
"""Why a piece or a final marker is dropped: its run was retired by a newer run of the same id."""
ENDED = "ended"
"""Why `add` drops a piece: the event finished (not counted: nothing was missing from its deltas)."""


class PieceBuffer:
    """Open events by handle, one per id; `take` empties it into at most one delta per event."""

    def __init__(self, max_chars: int, run_prefix: str = "") -> None:
        """`run_prefix` makes run tokens unique beyond this buffer (the writer's: random per process)."""
        self.max_chars = max_chars
        self.chars = 0  # text waiting, all events together
        self._open: dict[int, _Open] = {}
        self._by_id: dict[tuple[str, str], int] = {}  # (route, id) -> the handle of its open run
        self._handles = itertools.count()
        self._run_prefix = run_prefix

    def __len__(self) -> int:
        """Events open: streaming, or finished with their final delta not taken yet."""
        return len(self._open)

    def open(self, event_id: str, route: str, key: str | None, record_key: bytes | None) -> tuple[int, int]:
        """Start a run of an event's answer: its handle, and how many deltas of an older run of the route's id
        this retires (its pending text and its final marker, dropped: the caller counts them)."""
        retired = 0
        if (older := self._by_id.pop((route, event_id), None)) is not None:
            entry = self._open[older]
            retired = 1 + int(bool(entry.pending) and not entry.final)  # its pending delta, its marker
            self.chars -= entry.chars
            entry.pending, entry.chars, entry.retired = [], 0, True
        handle = next(self._handles)
        self._open[handle] = _Open(f"{self._run_prefix}{handle}", event_id, route, key, record_key)
        self._by_id[route, event_id] = handle
        return handle, retired

    def add(self, handle: int, piece: str) -> str | None:
        """Queue a piece of the event's text; None when queued, else why it was dropped: `BUFFER` (the buffer
        is full, or was for an earlier piece of the event), `SUPERSEDED` (a newer run of the id is open) or
        `ENDED` (the event finished)."""
        entry = self._open.get(handle)
        if entry is not None and entry.retired:
            return SUPERSEDED
        if entry is None or entry.final:
            return ENDED
        if entry.lost:
            return BUFFER
        if self.chars + len(piece) > self.max_chars:
            entry.lost = True
            return BUFFER
        entry.pending.append(piece)
        entry.chars += len(piece)
        self.chars += len(piece)
        return None

    def broken(self, handle: int) -> None:
        """Text of the event is missing (its source's stream broke): its final marker shows a gap, and its
        further pieces are dropped, so its deltas still join."""
        if (entry := self._open.get(handle)) is not None and not entry.final:
            entry.lost = True

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
            if entry.retired:  # kept only to tell its late pieces from an ended event's
                if entry.final:
                    del self._open[handle]
                continue
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
                if self._by_id.get((entry.route, entry.id)) == handle:
                    del self._by_id[entry.route, entry.id]
        return deltas

    @staticmethod
    def _delta(entry: _Open, text: str, *, final: bool) -> Delta:
        delta = Delta(entry.id, entry.route, entry.key, entry.record_key, entry.seq, text, final,
                      first=not entry.started, error=entry.error if final else None, run=entry.run)
        entry.seq, entry.started = entry.seq + 1, True
        return delta
