"""The simulation (tests/sim/machine.py) as a test: a fixed-seed profile in `make test`."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.sim.machine import Simulation

QUICK = settings(max_examples=60, stateful_step_count=60, derandomize=True, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


@pytest.mark.xfail(strict=True, reason="e3474c9's pipeline logic: batch watermarks, exactly-once stalls and "
                   "poison pills the simulation finds by itself (RELIABILITY.md); the next commit fixes them")
def test_the_pipeline_keeps_its_guarantees_under_every_simulated_fault() -> None:
    run_state_machine_as_test(Simulation, settings=QUICK)
