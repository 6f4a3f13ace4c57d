"""The vocabulary shared by the window engines: aggregators, open windows and what `add` reports."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from streamer.windows.assign import Window

S = TypeVar("S")
E = TypeVar("E")
E_contra = TypeVar("E_contra", contravariant=True)

NO_WATERMARK_MS = -(2**63)
"""Internal stand-in for "no watermark yet": below any event time, so comparisons need no None checks."""


def key_order(key: Any) -> tuple[bool, Any]:
    """Sort key for window keys: None (unkeyed messages) first, then the keys' own order."""
    return (key is not None, key)


class Aggregator(Protocol[S, E_contra]):
    """Folds events into a window's state; `merge` joins two session windows' states (a before b)."""

    def create(self) -> S: ...

    def add(self, state: S, event: E_contra) -> S:
        """Fold one event in; may mutate and return `state`."""
        ...

    def merge(self, a: S, b: S) -> S:
        """Combine two states; may mutate and return `a`."""
        ...


Member = tuple[int, Any, Any]
"""One event held by a window: (event time, ref, event)."""


Lost = Callable[[Any], bool]
"""Whether an event, by its ref, must leave the windows (e.g. its partition was revoked)."""


@dataclass(eq=False, slots=True)
class OpenWindow(Generic[S]):
    """One key's window being aggregated; mutable, compared by identity.

    `first_ts_ms`/`last_ts_ms` are the lowest and highest event times in it (not arrival order);
    `refs` are the opaque handles of its events, in no particular order: the app passes
    ((topic, partition), offset) so an open window keeps those offsets uncommitted until it is emitted.
    `times` and `events` run parallel to `refs` (three lists are smaller than a tuple per event), so
    the window can be rebuilt without some of its events (`refold`); both stay empty in an engine
    that does not keep its events.
    """

    key: Any
    window: Window
    state: S
    count: int
    first_ts_ms: int
    last_ts_ms: int
    refs: list[Any] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)

    def extend(self, other: "OpenWindow[Any]") -> None:
        self.refs += other.refs
        self.times += other.times
        self.events += other.events

    def holds_any(self, lost: Lost) -> bool:
        return any(lost(ref) for ref in self.refs)

    def members(self, lost: Lost) -> list[Member]:
        """(time, ref, event) of each event that is not lost, in the order they were added."""
        return [m for m in zip(self.times, self.refs, self.events, strict=True) if not lost(m[1])]


def refold(window: OpenWindow[S], aggregator: "Aggregator[S, Any]", members: list[Member]) -> None:
    """Rebuild a window's aggregate from `members` alone, as if only they had been added; the
    bounds stay (a session's are the caller's to set)."""
    state = aggregator.create()
    for _, _, event in members:
        state = aggregator.add(state, event)
    window.state, window.count = state, len(members)
    window.times = [ts_ms for ts_ms, _, _ in members]
    window.refs = [ref for _, ref, _ in members]
    window.events = [event for _, _, event in members]
    if members:
        window.first_ts_ms, window.last_ts_ms = min(window.times), max(window.times)


@dataclass(frozen=True, slots=True)
class Added:
    """What `add` did with an event: the windows it joined, ascending by start, or late and dropped.

    Each joined window keeps the event's ref once, and session merges keep it once in the merged
    session, so `expire` hands the ref back exactly len(windows) times: hold its offset that often.
    Instances are shared between events; they are immutable.
    """

    late: bool
    windows: tuple[Window, ...]


LATE = Added(late=True, windows=())


class WatermarkFloor:
    """The highest watermark an engine has been given: windows closed by it never reopen."""

    def __init__(self) -> None:
        self._watermark_ms = NO_WATERMARK_MS

    @property
    def watermark_ms(self) -> int | None:
        return None if self._watermark_ms == NO_WATERMARK_MS else self._watermark_ms

    def _advance(self, watermark_ms: int | None) -> None:
        if watermark_ms is not None and watermark_ms > self._watermark_ms:
            self._watermark_ms = watermark_ms
