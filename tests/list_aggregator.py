"""An aggregator whose state is the list of what was folded in, so a lost, kept or doubled event shows."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class ListAggregator(Generic[T]):
    def create(self) -> list[T]:
        return []

    def add(self, state: list[T], event: T) -> list[T]:
        state.append(event)
        return state

    def merge(self, a: list[T], b: list[T]) -> list[T]:
        return a + b
