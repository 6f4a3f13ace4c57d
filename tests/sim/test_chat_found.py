"""Sequences the adversarial review of `task: chat` found, replayed on the simulation as scripts: each one broke
a guarantee of RELIABILITY.md once, and each runs every check of the simulation at the end (`teardown`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import orjson
import pytest

from streamer.tasks.chat import SUMMARY_SYSTEM, decode
from tests.sim.kafka import Stored
from tests.sim.machine import BASE_MS, FAULTS, Output, Simulation, quiet_logs
from tests.sim.test_chat_sequences import say


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


@pytest.fixture
def bare() -> Iterator[Simulation]:
    """A simulation whose end checks are not run: they assume every event's id is its own."""
    with quiet_logs():
        machine = Simulation.only(*FAULTS)()
        try:
            yield machine
        finally:
            if machine.instance is not None:
                machine.instance.crash()
            machine.loop.close()
            asyncio.set_event_loop(None)


def test_a_later_turn_that_reuses_an_earlier_turns_id_is_asked_of_the_model(bare) -> None:
    """Finding 2: a replay was told by its event id alone, so a later turn of the conversation that reused an id
    (a client whose message counter restarts, a constant id) was answered with the earlier turn's answer, without
    the model, and never joined the history: its question was lost. The answer-reuse cache checks a digest of
    what the event asked for exactly this; the history now keeps one per kept answer."""
    sim = bare
    sim.configure(shape="chat", exactly_once=False, lateness_ms=0)
    for text in ("what is two and two", "and what is three and three"):
        doc = {"id": "m-1", "key": "c", "text": text, "ts": BASE_MS}
        sim.cluster.append(0, Stored(b"c", orjson.dumps(doc), sim.cluster_now_ms()))
        answer_all(sim, fail_summaries=False)
    out = Output(sim.cluster)
    assert sim.attempts["and what is three and three"] == 1, "the second turn is asked of the model"
    assert len({a["output"] for a in out.answers}) == 2
    history = decode(sim.state.chats[("r", "c")][0])
    assert [t.user for t in history.turns] == ["what is two and two", "and what is three and three"]
