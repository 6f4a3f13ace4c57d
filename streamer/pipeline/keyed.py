"""First in, first out per key, one item of a key out at a time: per-key order with different keys in
parallel. Pure bookkeeping; whoever runs an item asks for the key's next one when it is finished."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass
class KeyedQueues(Generic[K, T]):
    """A key is busy while one of its items is out; its later items wait here in arrival order."""

    _waiting: dict[K, deque[T]] = field(default_factory=dict)

    def push(self, key: K, item: T) -> bool:
        """True: the key was idle and `item` is out now (the caller runs it); False: it waits its turn."""
        if key in self._waiting:
            self._waiting[key].append(item)
            return False
        self._waiting[key] = deque()
        return True

    def next(self, key: K) -> T | None:
        """The key's item out is finished: its next item is out now, or None and the key is idle."""
        waiting = self._waiting[key]
        if waiting:
            return waiting.popleft()
        del self._waiting[key]
        return None

    def drop(self, gone: Callable[[T], bool]) -> int:
        """Take out every waiting item `gone` names (items out stay out); returns how many."""
        dropped = 0
        for waiting in self._waiting.values():
            kept = deque(item for item in waiting if not gone(item))
            dropped += len(waiting) - len(kept)
            waiting.clear()
            waiting.extend(kept)
        return dropped
