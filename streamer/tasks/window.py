"""Window tasks as values: what a window keeps of its events and adds to its result beyond the count.
The window stage and event handling read these flags instead of comparing names, so a new window task
is one entry in `WINDOW_TASKS` (and its name in `WindowTaskName`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

WindowTaskName = Literal["count", "stats", "summarize"]
"""What `WindowSettings.task` accepts: the keys of `WINDOW_TASKS` (a test keeps the two equal)."""


@dataclass(frozen=True)
class WindowTask:
    """Every window counts its events (and first and last event time); a task may add to that."""

    name: str
    stats: bool = False
    """The result carries text statistics (`TextStats`)."""
    summarizes: bool = False
    """The window keeps its texts, folds them into a running summary (model calls) and its result carries it."""

    @property
    def counts_tokens(self) -> bool:
        """Each event's tokens are counted (a tokenizer call): stats report them, summaries are budgeted by them."""
        return self.stats or self.summarizes


WINDOW_TASKS: Mapping[str, WindowTask] = MappingProxyType({task.name: task for task in (
    WindowTask("count"),
    WindowTask("stats", stats=True),
    WindowTask("summarize", summarizes=True),
)})
