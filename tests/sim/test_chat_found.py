"""Sequences the adversarial review of `task: chat` found, replayed on the simulation as scripts: each one broke
a guarantee of RELIABILITY.md once, and each runs every check of the simulation at the end (`teardown`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from streamer.tasks.chat import SUMMARY_SYSTEM, decode
from tests.sim.machine import FAULTS, Output, Simulation, quiet_logs
from tests.sim.test_chat_sequences import say


@pytest.fixture
def sim() -> Iterator[Simulation]:
    with quiet_logs():
        machine = Simulation.only(*FAULTS)()
        try:
            yield machine
        finally:
            machine.teardown()


def answer_all(sim: Simulation, fail_summaries: bool) -> None:
    """Poll, then answer every request the model has: each summary fails where `fail_summaries` (a greedy model
    fails the same request every time), every reply succeeds; write."""
    assert sim.instance is not None
    for _ in range(20):
        sim.poll(batch=500)
        sim.loop.settle()
        pool = sim.instance.pool
        while pool.pending:
            summary = pool.pending[0].request.messages[0]["content"] == SUMMARY_SYSTEM
            pool.finish(0, ok=not (summary and fail_summaries))
            sim.loop.settle()
        sim.deliver(count=1000)
        sim.loop.advance(0.05)


def test_a_fold_the_model_always_fails_does_not_dead_letter_every_later_turn(sim) -> None:
    """Finding 1: a fold whose summary the model fails made the turn a `model_error` dead letter and left the
    history as it was, so the next turn asked for the very same summary. A greedy model fails (or answers empty)
    the same request every time, so every later turn of the conversation was dead-lettered until the history
    expired: one input poisoned its conversation. Now a failed summary drops the oldest turns (the old summary
    stays) and the turn is answered."""
    sim.configure(shape="chat", exactly_once=False, lateness_ms=0)
    turns = [say(sim, "c", f"conversation c turn {t} " + "words " * 6, 0) for t in range(6)]
    answer_all(sim, fail_summaries=True)
    out = Output(sim.cluster)
    assert not out.letters, f"dead letters: {[(d['id'], d['error']) for d in out.letters]}"
    assert [a["id"] for a in out.answers] == turns
    history = decode(sim.state.chats[("r", "c")][0])
    assert [i for i, _ in history.answers] == turns
    assert history.tokens <= sim.route.max_history_tokens + history.turns[-1].tokens
