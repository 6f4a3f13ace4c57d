"""What the simulation's input must come out as, computed from the input log alone (brute force).

Window semantics, the README's: per input partition, in offset order, an event is placed under the
watermark its predecessors set (highest event time before it, minus the allowed lateness), whatever
the batching, the timing or the restarts; late iff every window covering it has ended at or before
that watermark. Per-key windows are kept per partition. Sessions merge events whose proto-sessions
[ts, ts + gap) touch, among sessions still open under the watermark.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from streamer.config import WindowSettings
from streamer.pipeline.window_stage import window_id


@dataclass(frozen=True)
class Event:
    """A produced message as the simulation meant it: valid (`code` None) or the dead letter it must give."""

    partition: int
    offset: int
    key: str | None
    ts_ms: int
    text: str
    code: str | None  # the dead-letter code a bad message must get


@dataclass
class Expected:
    late: set[tuple[int, int]] = field(default_factory=set)  # (partition, offset)
    windows: dict[str, list[Event]] = field(default_factory=dict)  # window id -> events
    membership: dict[tuple[int, int], list[str]] = field(default_factory=dict)  # event -> its window ids


def expect(route: str, window: WindowSettings, events: list[Event]) -> Expected:
    """Late events and window members for the valid events, per partition in offset order."""
    expected = Expected()
    by_partition: dict[int, list[Event]] = defaultdict(list)
    for event in sorted(events, key=lambda e: (e.partition, e.offset)):
        if event.code is None:
            by_partition[event.partition].append(event)
    for partition, stream in by_partition.items():
        place = _sessions if window.kind == "session" else _grid
        for key_window, members in place(window, stream, expected).items():
            key, start_ms, end_ms = key_window
            wid = window_id(route, key, window.kind, start_ms, end_ms, partition)
            expected.windows[wid] = members
            for member in members:
                expected.membership.setdefault((member.partition, member.offset), []).append(wid)
    return expected


def tumbling(route: str, window: WindowSettings, events: list[Event], late: set[tuple[int, int]]) -> Expected:
    """Wall-clock mode: which events are late depends on timing, so `late` is what the pipeline said;
    every other valid event belongs to exactly its tumbling window, and nothing else does."""
    expected = Expected(late=late & {(e.partition, e.offset) for e in events})
    size_ms = window.size_ms or 0
    for event in events:
        if (event.partition, event.offset) in expected.late:
            continue
        start_ms = event.ts_ms // size_ms * size_ms
        wid = window_id(route, event.key, "tumbling", start_ms, start_ms + size_ms, event.partition)
        expected.windows.setdefault(wid, []).append(event)
        expected.membership[(event.partition, event.offset)] = [wid]
    return expected


def _marks(window: WindowSettings, stream: list[Event]) -> list[int | None]:
    marks: list[int | None] = []
    high: int | None = None
    for event in stream:
        marks.append(None if high is None else high - window.allowed_lateness_ms)
        high = event.ts_ms if high is None else max(high, event.ts_ms)
    return marks


def _grid(window: WindowSettings, stream: list[Event], expected: Expected) -> dict[tuple, list[Event]]:
    size_ms = window.size_ms or 0
    step_ms = window.slide_ms or size_ms
    members: dict[tuple, list[Event]] = defaultdict(list)
    for event, mark in zip(stream, _marks(window, stream), strict=True):
        first = (event.ts_ms - size_ms) // step_ms * step_ms
        covering = [(s, s + size_ms) for s in range(first, event.ts_ms + 1, step_ms) if s <= event.ts_ms < s + size_ms]
        still_open = [(s, e) for s, e in covering if mark is None or e > mark]
        if not still_open:
            expected.late.add((event.partition, event.offset))
        for start_ms, end_ms in still_open:
            members[(event.key, start_ms, end_ms)].append(event)
    return members


def _sessions(window: WindowSettings, stream: list[Event], expected: Expected) -> dict[tuple, list[Event]]:
    """Sessions merge touching proto-sessions [ts, ts + gap) while they stay shorter than the maximum;
    past it an event joins the earliest session it touches alone, or starts the next one."""
    gap_ms, max_ms = window.gap_ms or 0, window.max_duration_ms
    live: list[tuple[str | None, list[Event]]] = []

    def span(events: list[Event], ts_ms: int) -> int:
        times = [e.ts_ms for e in events] + [ts_ms]
        return max(times) - min(times)

    def bounds(session: tuple[str | None, list[Event]]) -> tuple[int, int]:
        times = [e.ts_ms for e in session[1]]
        return min(times), min(max(times) + gap_ms, min(times) + max_ms)

    for event, mark in zip(stream, _marks(window, stream), strict=True):
        wm = -(2**63) if mark is None else mark
        ts = event.ts_ms
        touching = [s for s in live if s[0] == event.key and bounds(s)[1] > wm and bounds(s)[0] <= ts + gap_ms
                    and ts <= bounds(s)[1] and span(s[1], ts) < max_ms]
        if len(touching) > 1 and span([e for s in touching for e in s[1]], ts) >= max_ms:
            touching = [min(touching, key=lambda s: bounds(s)[0])]
        if not touching and ts + gap_ms <= wm:
            expected.late.add((event.partition, event.offset))
            continue
        live = [s for s in live if all(s is not t for t in touching)]
        live.append((event.key, [event, *(e for s in touching for e in s[1])]))
    return {(key, *bounds((key, events))): events for key, events in live}
