"""Fixtures the unit tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.sim.loop import VirtualLoop


@pytest.fixture
def loop() -> Iterator[VirtualLoop]:
    """An event loop on virtual time (the simulation's), set as the current one; its tasks end with the test."""
    loop = VirtualLoop()
    asyncio.set_event_loop(loop)
    yield loop
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.settle()
    loop.close()
    asyncio.set_event_loop(None)
