"""Session windows: per key, events at most the gap apart form one window, merging as gaps fill in.

An event at ts is a proto-session [ts, ts + gap). It merges with every open session of its key that
it overlaps or touches (closed intervals meet: s1 <= e2 and s2 <= e1, as in Flink and Kafka Streams,
so events exactly `gap_ms` apart share a session). A session is [first event ts, last event ts + gap)
and is closed once the watermark reaches its end. An event whose proto-session is already closed is
late unless it merges with an open session; closed sessions are never reopened. (Such a bridging
event may stretch an open session back over time that an already emitted session covered.)

A session spans less than `max_duration_ms` (when set): an event joins a session only if the session
with it still would, and its window ends at first ts + max_duration_ms at the latest; an event past
that starts the next session. So a key that never pauses for a gap still gets its sessions closed,
and its partition's offsets committed. Touching sessions merge only if the merged one would still be
short enough; otherwise the event joins the earliest of them alone. (With this limit the sessions of
out-of-order events depend on their order, which per partition is the log's.)

`expire` pops a heap of session ends. A heap entry is lazily refreshed: popped with an outdated end it
is pushed again under the current one, and entries of sessions merged away are skipped. A session
whose end moves earlier (an early event shortens what its maximum allows) gets a fresh entry at once.
Nothing is scanned while nothing can close.
"""

import heapq
import itertools
from typing import Any, Generic

from streamer.windows.assign import Window, WindowSpec
from streamer.windows.model import (
    LATE,
    Added,
    Aggregator,
    E,
    Lost,
    Member,
    OpenWindow,
    S,
    WatermarkFloor,
    key_order,
    refold,
)


class SessionWindows(WatermarkFloor, Generic[S, E]):
    """Session windows per key; see `WindowEngine` for the contract."""

    def __init__(self, spec: WindowSpec, aggregator: Aggregator[S, E], keep_events: bool = True) -> None:
        if spec.kind != "session" or spec.gap_ms is None:
            raise ValueError("SessionWindows takes session specs")
        self.spec = spec
        self._keep_events = keep_events
        self._gap_ms = spec.gap_ms
        self._max_ms = spec.max_duration_ms
        self._aggregator = aggregator
        self._sessions: dict[Any, list[OpenWindow[S]]] = {}  # per key, including closed-not-yet-expired
        # heap of (end when pushed, key order, seq, session): the next session to close is at [0]
        self._ends: list[tuple[int, tuple[bool, Any], int, OpenWindow[S]]] = []
        self._seq = itertools.count()
        super().__init__()
        self._open = 0

    def add(self, key: Any, ts_ms: int, event: E, ref: Any, watermark_ms: int | None) -> Added:
        self._advance(watermark_ms)
        proto_end_ms = ts_ms + self._gap_ms
        sessions = self._sessions.get(key, [])
        touching = [
            s
            for s in sessions
            if s.window.end_ms > self._watermark_ms and s.window.start_ms <= proto_end_ms and ts_ms <= s.window.end_ms
            and self._fits(s.first_ts_ms, s.last_ts_ms, ts_ms)
        ]
        if len(touching) > 1 and not self._fits(min(s.first_ts_ms for s in touching),
                                               max(s.last_ts_ms for s in touching), ts_ms):
            touching = [min(touching, key=lambda s: s.window.start_ms)]
        if touching:
            session = self._merge(touching, sessions)
        elif proto_end_ms <= self._watermark_ms:
            return LATE
        else:
            session = self._start(key, ts_ms)
        session.state = self._aggregator.add(session.state, event)
        session.count += 1
        session.refs.append(ref)
        if self._keep_events:
            session.times.append(ts_ms)
            session.events.append(event)
        if ts_ms < session.first_ts_ms or ts_ms > session.last_ts_ms:
            session.first_ts_ms = min(session.first_ts_ms, ts_ms)
            session.last_ts_ms = max(session.last_ts_ms, ts_ms)
            self._reshape(session)
        return Added(late=False, windows=(session.window,))

    def _fits(self, first_ms: int, last_ms: int, ts_ms: int) -> bool:
        """Whether a session spanning [first, last] would still span less than the maximum with ts in it."""
        return self._max_ms is None or max(last_ms, ts_ms) - min(first_ms, ts_ms) < self._max_ms

    def _bounds(self, first_ms: int, last_ms: int) -> Window:
        end_ms = last_ms + self._gap_ms
        return Window(first_ms, end_ms if self._max_ms is None else min(end_ms, first_ms + self._max_ms))

    def _reshape(self, session: OpenWindow[S]) -> None:
        """Bounds from its events; an end moved earlier gets a heap entry of its own (the old one goes stale)."""
        before = session.window.end_ms
        session.window = self._bounds(session.first_ts_ms, session.last_ts_ms)
        if session.window.end_ms < before:
            heapq.heappush(self._ends, (session.window.end_ms, key_order(session.key), next(self._seq), session))

    def expire(self, watermark_ms: int | None) -> list[OpenWindow[S]]:
        self._advance(watermark_ms)
        ends = self._ends
        closed: list[OpenWindow[S]] = []
        while ends and ends[0][0] <= self._watermark_ms:
            end_ms, order, _, session = heapq.heappop(ends)
            key = session.key
            sessions = self._sessions.get(key, [])
            if not any(s is session for s in sessions):
                continue  # merged into another session, which has its own entry
            if session.window.end_ms != end_ms:
                heapq.heappush(ends, (session.window.end_ms, order, next(self._seq), session))
                continue  # grew since it was pushed: it closes later, in its proper place
            self._forget(key, sessions, [session])
            closed.append(session)
        return closed

    def open_count(self) -> int:
        return self._open

    def peek(self, key: Any) -> list[OpenWindow[S]]:
        sessions = self._sessions.get(key, [])
        return sorted((s for s in sessions if s.window.end_ms > self._watermark_ms), key=lambda s: s.window.start_ms)

    def drop(self, lost: Lost) -> int:
        """Rebuild the sessions holding lost events from the others: what is left splits where its
        events are more than a gap apart (closed parts close at the next `expire`), or goes."""
        taken = 0
        for key, sessions in list(self._sessions.items()):
            hit = [s for s in sessions if s.holds_any(lost)]
            if not hit:
                continue
            self._forget(key, sessions, hit)
            for session in hit:
                kept = session.members(lost)
                taken += session.count - len(kept)
                for run in self._runs(sorted(kept, key=lambda m: m[0])):
                    rebuilt = self._start(key, run[0][0])
                    refold(rebuilt, self._aggregator, run)
                    self._reshape(rebuilt)
        return taken

    def _runs(self, members: list[Member]) -> list[list[Member]]:
        """Members in event-time order, cut where two are more than a gap apart or a run reaches the maximum."""
        runs: list[list[Member]] = []
        for member in members:
            run = runs[-1] if runs else None
            if run and member[0] <= run[-1][0] + self._gap_ms and self._fits(run[0][0], member[0], member[0]):
                runs[-1].append(member)
            else:
                runs.append([member])
        return runs

    def _start(self, key: Any, ts_ms: int) -> OpenWindow[S]:
        """A new session holding no events yet; `add` folds the first one in."""
        window = self._bounds(ts_ms, ts_ms)
        session = OpenWindow(key, window, self._aggregator.create(), 0, ts_ms, ts_ms)
        self._sessions.setdefault(key, []).append(session)
        heapq.heappush(self._ends, (window.end_ms, key_order(key), next(self._seq), session))
        self._open += 1
        return session

    def _merge(self, touching: list[OpenWindow[S]], sessions: list[OpenWindow[S]]) -> OpenWindow[S]:
        """Fold every touched session into one; states merge in start order, refs move small to large."""
        if len(touching) == 1:
            return touching[0]
        touching.sort(key=lambda s: s.window.start_ms)
        survivor = max(touching, key=lambda s: len(s.refs))
        state = touching[0].state
        for other in touching[1:]:
            state = self._aggregator.merge(state, other.state)
        others = [s for s in touching if s is not survivor]
        for other in others:
            survivor.extend(other)
        survivor.state = state
        survivor.count = sum(s.count for s in touching)
        survivor.first_ts_ms = min(s.first_ts_ms for s in touching)
        survivor.last_ts_ms = max(s.last_ts_ms for s in touching)
        self._reshape(survivor)
        self._forget(touching[0].key, sessions, others)
        return survivor

    def _forget(self, key: Any, sessions: list[OpenWindow[S]], gone: list[OpenWindow[S]]) -> None:
        """Drop sessions of a key (expired or merged away); their heap entries become stale."""
        sessions[:] = [s for s in sessions if all(s is not g for g in gone)]
        if not sessions:
            del self._sessions[key]
        self._open -= len(gone)
