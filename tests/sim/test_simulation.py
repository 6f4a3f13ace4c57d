"""The simulation (tests/sim/machine.py) as a test: a fixed-seed profile of each mode inside `make test`
(well under a minute), and a long random one in `make test-sim` (tests/sim/long.py)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.sim.machine import FAULTS, Simulation, quiet_logs

QUICK = settings(max_examples=300, stateful_step_count=60, derandomize=True, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("wall_clock", [False, True], ids=["event time", "wall clock"])
def test_the_pipeline_keeps_its_guarantees_under_every_simulated_fault(wall_clock: bool) -> None:
    with quiet_logs():
        run_state_machine_as_test(Simulation.only(*FAULTS, wall_clock=wall_clock), settings=QUICK)
