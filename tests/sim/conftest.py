"""Fixtures of the scripted simulation tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.sim.machine import FAULTS, Simulation, quiet_logs


@pytest.fixture
def sim() -> Iterator[Simulation]:
    """A simulation with every fault available (a script chooses which happen), its end checks run at teardown."""
    with quiet_logs():
        machine = Simulation.only(*FAULTS)()
        try:
            yield machine
        finally:
            machine.teardown()
