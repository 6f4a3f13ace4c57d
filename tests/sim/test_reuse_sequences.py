"""Answer reuse under the adversarial review's sequences: look-ups of kept answers pending across a revoke or a
lost assignment and a reassign, a crash, Redis away. The review found nothing to fix; these stay as specifications. The
simulation's teardown checks outcomes, offsets, windows (label counts) and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.sim.machine import BASE_MS, FAULTS, Simulation, quiet_logs
from tests.sim.test_found_sequences import produce


@pytest.fixture
def sim() -> Iterator[Simulation]:
    with quiet_logs():
        machine = Simulation.only(*FAULTS, wall_clock=False)()
        try:
            yield machine
        finally:
            machine.teardown()


def keep_some(sim: Simulation, shape: str, exactly_once: bool) -> None:
    sim.configure(shape=shape, exactly_once=exactly_once, lateness_ms=0)
    for i in range(6):
        produce(sim, i % 3, BASE_MS + 10 * i)
    sim.poll(batch=500)
    for _ in range(4):
        sim.instance.pool.finish(0, ok=True)
    sim.loop.settle()
    if exactly_once:
        sim.loop.advance(0.15)
    else:
        sim.deliver(count=100)
    sim.crash()
    sim.restart()


@pytest.mark.parametrize("kind", ["revoke", "lose"])
@pytest.mark.parametrize(("exactly_once", "shape"), [(False, "classify+tumbling"), (True, "classify+tumbling"),
                                                     (False, "answer"), (True, "answer")])
def test_a_revoke_and_reassign_while_look_ups_are_pending(sim, kind, exactly_once, shape) -> None:
    keep_some(sim, shape, exactly_once)
    sim.state.slow_lookups = asyncio.Event()
    sim.poll(batch=500)  # the replay's look-ups wait
    assert sim.instance.pipeline._handler.looking_up > 0
    sim.rebalance(kind, {0, 1})
    sim.rebalance("assign", {0, 1})
    sim.poll(batch=500)  # the new epoch's replay, look-ups wait too
    sim.state.slow_lookups.set()
    sim.loop.settle()
    sim.state.slow_lookups = None
    for _ in range(6):
        sim.pump()


@pytest.mark.parametrize(("exactly_once", "shape"), [(False, "classify+tumbling"), (True, "answer")])
def test_shutdown_and_crash_with_look_ups_pending_and_redis_away(sim, exactly_once, shape) -> None:
    keep_some(sim, shape, exactly_once)
    sim.state.slow_lookups = asyncio.Event()
    sim.poll(batch=500)
    sim.redis(up=False)
    sim.state.slow_lookups.set()
    sim.state.slow_lookups = None
    sim.loop.advance(2.0)
    sim.crash()
    sim.redis(up=True)
    sim.restart()
    for _ in range(6):
        sim.pump()
