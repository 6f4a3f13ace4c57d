"""A streaming route on the simulation: its progress is a side channel. Answers, dead letters, commits and
Redis pass every check of the simulation as for any route, and the deltas in Redis join to the answers, or
end in a marker naming the dead letter where the model failed; a crash mid-stream replays from seq 0."""

from __future__ import annotations

import pytest

from tests.sim.machine import FAULTS, Simulation, quiet_logs
from tests.sim.test_found_sequences import produce


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at least once", "exactly once"])
def test_a_streaming_route_ends_each_event_once_and_its_deltas_join_to_its_answer(exactly_once) -> None:
    with quiet_logs():
        sim = Simulation.only(*FAULTS)()
        try:
            sim.configure(shape="answer", exactly_once=exactly_once, lateness_ms=0)
            for i in range(6):
                produce(sim, i % 3, sim.cluster_now_ms(), key="abc"[i % 3])
            sim.poll(batch=500)
            sim.finish_request(0, ok=False)  # a model error: a dead letter, and a final marker saying so
            sim.finish_request(0, ok=True)
            sim.loop.advance(0.2)  # a flush of the pieces; no record acknowledged yet, so nothing committed
            assert [d.error for d in sim.state.partials if d.final] in (["model_error", None], [None, "model_error"])
            sim.crash()  # mid-stream: the replay streams the events again from their start
            sim.restart()
            sim.pump()
            sim.loop.advance(0.2)
            firsts = [d.id for d in sim.state.partials if d.first]
            assert len(firsts) == 6 + 1 + 1  # each once, and the two streamed before the crash twice
            assert sum(d.final and d.error is None for d in sim.state.partials) >= 6
        finally:
            sim.teardown()  # every check: outcomes once, commits, Redis, and the deltas against the answers
