"""Which queued request goes to the server next: the earliest deadline among those ready, if its tokens fit
the budget of tokens in flight.

A request waiting out a backoff is not ready until its time comes. The head is never skipped for a smaller
request behind it (that would starve long prompts); a request larger than the whole budget goes alone.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True)
class _Entry(Generic[T]):
    key: tuple[float, int]  # (deadline or due time, arrival order)
    tokens: int = field(compare=False)
    deadline_s: float = field(compare=False)
    item: T = field(compare=False)


@dataclass
class Schedule(Generic[T]):
    budget_tokens: int
    inflight_tokens: int = field(default=0, init=False)
    _ready: list[_Entry[T]] = field(default_factory=list, init=False)  # by deadline
    _waiting: list[_Entry[T]] = field(default_factory=list, init=False)  # by due time
    _order: itertools.count[int] = field(default_factory=itertools.count, init=False)

    def __len__(self) -> int:
        return len(self._ready) + len(self._waiting)

    def add(self, item: T, deadline_s: float, tokens: int, not_before_s: float | None = None) -> None:
        """Queue `item`; with `not_before_s` it becomes ready only then (a retry's backoff)."""
        if not_before_s is None:
            heapq.heappush(self._ready, _Entry((deadline_s, next(self._order)), tokens, deadline_s, item))
        else:
            heapq.heappush(self._waiting, _Entry((not_before_s, next(self._order)), tokens, deadline_s, item))

    def take(self, now_s: float) -> T | None:
        """The next request to send, its tokens counted in flight until `done`; None when none may go now."""
        while self._waiting and self._waiting[0].key[0] <= now_s:
            self._make_ready(heapq.heappop(self._waiting))
        if not self._ready:
            return None
        head = self._ready[0]
        if self.inflight_tokens and self.inflight_tokens + head.tokens > self.budget_tokens:
            return None
        heapq.heappop(self._ready)
        self.inflight_tokens += head.tokens
        return head.item

    def done(self, tokens: int) -> None:
        """A request taken earlier is no longer at the server."""
        self.inflight_tokens -= tokens

    def next_due_s(self) -> float | None:
        """When the earliest backing-off request becomes ready."""
        return self._waiting[0].key[0] if self._waiting else None

    def ready_all(self) -> None:
        """End every backoff now (the server is back)."""
        for due in self._waiting:
            self._make_ready(due)
        self._waiting.clear()

    def _make_ready(self, due: _Entry[T]) -> None:
        heapq.heappush(self._ready, _Entry((due.deadline_s, due.key[1]), due.tokens, due.deadline_s, due.item))
