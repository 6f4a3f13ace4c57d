"""The event-time window engine: per-key aggregates over tumbling, sliding or session windows.

A window [start, end) is open while the watermark is below `end` and closed once watermark >= end
(the watermark already includes the allowed lateness, see `watermark.py`). An event joins every
window covering it that is still open; it is late only if all of them are closed, and then nothing
changes. Closed-ness is judged by the highest watermark the engine has been given, never by
remembering closed windows, so state is bounded by what is open and a closed window never reopens.

Emit-final: `expire(watermark)` hands over each closed window exactly once, ordered by
(end, key, start), and forgets it. Emit-on-update: `peek(key)` shows a key's open windows, for
provisional results. Keys must be hashable and mutually orderable (str or bytes, as Kafka keys are).

Windows keep their events, so `drop` can take some out again (a revoked partition's, which its next
owner replays from before them) and rebuild what they leave from the rest: a window may hold events
of several partitions, and those still owned must stay counted, once. An engine whose windows never
mix partitions (one per partition) is dropped whole instead, and need not keep them
(`keep_events=False`): 0.60-0.69x the memory and up to 1.28x the events/s (`bench/windows.py`).

Pure logic: no I/O and no clock; the caller passes the watermark in (e.g. `Watermarks.current`).
"""

from typing import Any, Generic

from streamer.windows.assign import WindowSpec
from streamer.windows.grid import GridWindows
from streamer.windows.model import Added, Aggregator, E, Lost, OpenWindow, S, refold
from streamer.windows.sessions import SessionWindows

__all__ = ["Added", "Aggregator", "OpenWindow", "WindowEngine", "drop_from"]


class WindowEngine(Generic[S, E]):
    """Windows per key for one `WindowSpec`, folding events with an `Aggregator`."""

    def __init__(self, spec: WindowSpec, aggregator: Aggregator[S, E], *, keep_events: bool = True) -> None:
        self.spec = spec
        self.keep_events = keep_events
        self._aggregator = aggregator
        self._impl: GridWindows[S, E] | SessionWindows[S, E] = (
            SessionWindows(spec, aggregator, keep_events) if spec.kind == "session"
            else GridWindows(spec, aggregator, keep_events)
        )

    @property
    def watermark_ms(self) -> int | None:
        """The highest watermark given to `add` or `expire` so far; None before any."""
        return self._impl.watermark_ms

    def add(self, key: Any, ts_ms: int, event: E, ref: Any, watermark_ms: int | None) -> Added:
        """Fold one event into its open windows; `ref` is kept with them (e.g. to hold its offset)."""
        return self._impl.add(key, ts_ms, event, ref, watermark_ms)

    def expire(self, watermark_ms: int | None) -> list[OpenWindow[S]]:
        """Remove and return the windows with end <= watermark, ordered by (end, key, start)."""
        return self._impl.expire(watermark_ms)

    def open_count(self) -> int:
        """Windows held: open ones plus closed ones the next `expire` will hand over."""
        return self._impl.open_count()

    def peek(self, key: Any) -> list[OpenWindow[S]]:
        """The key's open windows (end > watermark) ascending by start; live objects, do not mutate."""
        return self._impl.peek(key)

    def drop(self, lost: Lost) -> int:
        """Take every event whose ref is `lost` out of the windows held, as if it had never been added.

        The other events stay in their windows, each ref still once per window; a window left empty
        is forgotten, a session left with a hole wider than the gap splits. Returns how many
        (event, window) parts were taken out. Needs the events kept.
        """
        if not self.keep_events:
            raise ValueError("drop needs an engine that keeps its events (keep_events=True)")
        return self._impl.drop(lost)


def drop_from(window: OpenWindow[S], aggregator: Aggregator[S, E], lost: Lost) -> int:
    """`WindowEngine.drop` for a window `expire` already handed over but not yet emitted (its engine
    may be gone with its partition); its bounds stay (its id is taken from them), and it may be left
    empty (count 0): then emit nothing. Emptying needs no kept events, keeping some does."""
    if not window.holds_any(lost):
        return 0
    before = window.count
    refold(window, aggregator, [] if all(map(lost, window.refs)) else window.members(lost))
    return before - window.count
