"""A streaming route on the simulation: its progress is a side channel. Answers, dead letters, commits and
Redis pass every check of the simulation as for any route, and the deltas in Redis join to the answers, or
end in a marker naming the dead letter where the model failed; a crash mid-stream replays from seq 0."""

from __future__ import annotations

from dataclasses import replace

import orjson
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
            assert len(firsts) == 6 + 6  # each streamed its head on admission, before the crash and again after
            assert sum(d.final and d.error is None for d in sim.state.partials) >= 6
        finally:
            sim.teardown()  # every check: outcomes once, commits, Redis, and the deltas against the answers


def _stream_deltas(sim: Simulation, event_id: str) -> list[tuple[int, str, bool]]:
    return [(d.seq, d.delta, d.final) for d in sim.state.streams.get(event_id, [])]


def test_a_replay_in_the_same_process_streams_one_run_per_event() -> None:
    """Partitions lost and assigned back while their requests still stream: the replay submits each event
    again (the model splits its answer elsewhere this time), and the earlier run is retired, so partial:{route}:{id}
    and the `partials` stream show each event's runs one after the other, never mixed."""
    with quiet_logs():
        sim = Simulation.only(*FAULTS)()
        try:
            sim.configure(shape="answer", exactly_once=False, lateness_ms=0)
            for i in range(3):
                produce(sim, 0, sim.cluster_now_ms(), key="abc"[i])
            sim.poll(batch=500)
            sim.loop.advance(0.2)  # the heads of the three answers are written
            assert sum(len(s) for s in sim.state.streams.values()) == 3
            sim.rebalance("lose", {0})
            sim.loop.settle()
            sim.rebalance("assign", {0})
            sim.poll(batch=500)  # the replay: the three again, while the first three still stream
            sim.loop.advance(0.2)
            assert sim.instance is not None and len(sim.instance.pool.pending) == 6
            while sim.instance.pool.pending:
                sim.finish_request(0, ok=True)  # the old runs end first: their tails are dropped (superseded)
            sim.loop.advance(0.2)
            for stream in sim.state.streams.values():
                assert [seq for seq, _, _ in _stream_deltas(sim, stream[0].id)] == [0, 1]
        finally:
            sim.teardown()


def test_the_end_check_refuses_two_runs_spliced_or_two_final_markers() -> None:
    """The end check reads partial:{route}:{id} as a reader does: a stream with two final markers, or the
    `partials` stream going back to an older run, fails it."""
    with quiet_logs():
        sim = Simulation.only(*FAULTS)()
        try:
            sim.configure(shape="answer", exactly_once=False, lateness_ms=0)
            produce(sim, 0, sim.cluster_now_ms(), key="a")
            sim.pump()
            sim._check_partials()  # as written: passes
            [stream] = sim.state.streams.values()
            last = stream[-1]
            stream.append(replace(last, seq=last.seq + 1))  # a second final marker
            with pytest.raises(AssertionError):
                sim._check_partials()
            stream.pop()
            sim.state.partials += [replace(last, run="older"), replace(last, run=last.run),
                                   replace(last, run="older")]
            with pytest.raises(AssertionError, match="written again after a newer run"):
                sim._check_partials()
            sim.state.partials[-3:] = []
        finally:
            sim.teardown()


def test_a_reused_answer_on_a_streaming_route_is_one_final_delta_of_a_new_run() -> None:
    """A replay answered from a kept answer is not generated again, so the model streams nothing for it: its
    progress is a new run whose one delta, seq 0 and final, is the kept answer's whole text. A reader of
    partial:{route}:{id} sees the answer it would have seen typed (the run the crash cut off replaced), and a final
    marker follows every answered event, hit or miss."""
    with quiet_logs():
        sim = Simulation.only(*FAULTS)()
        try:
            sim.configure(shape="answer", exactly_once=False, lateness_ms=0)
            for i in range(3):
                produce(sim, i, sim.cluster_now_ms(), key="abc"[i])
            sim.poll(batch=500)
            sim.loop.advance(0.06)  # a flush of the pieces: each answer's head
            assert sim.instance is not None
            sim.instance.pool.finish(0, ok=True)
            sim.instance.pool.finish(0, ok=True)  # two answered, one still streaming
            sim.loop.settle()
            sim.deliver(count=100)  # acknowledged, so written to Redis (and kept); not yet committed
            sim.loop.advance(0.06)  # the two answers' tails and final markers
            kept = {event_id for _, event_id in sim.state.kept}
            assert len(kept) == 2
            assert all(len(sim.state.streams[event_id]) == 2 for event_id in kept)  # head, tail: typed
            before = {event_id: sim.state.streams[event_id][-1].run for event_id in kept}
            sim.crash()
            sim.restart()
            sim.poll(batch=500)  # the replay: two hits, one miss for the model
            sim.loop.settle()
            assert sim.instance is not None and len(sim.instance.pool.pending) == 1
            sim.loop.advance(0.06)
            for event_id in kept:
                [delta] = sim.state.streams[event_id]
                output = orjson.loads(sim.state.kept[("r", event_id)].answer)["output"]
                assert (delta.seq, delta.delta, delta.final, delta.error) == (0, output, True, None)
                assert delta.first and delta.run != before[event_id]
            sim.pump()
        finally:
            sim.teardown()
