"""Conversations (`task: chat`) on the simulation: interleaved conversations on three partitions, with a crash
and restart, a revoke mid-conversation, a failed turn. Besides the simulation's own checks at the end (every
event's outcome; each conversation's history holds each turn at most once, in order, none lost; an answer on
the topic is its history's), each test says what a reader of the answers sees: per conversation, the turns
answered in order."""

from __future__ import annotations

import orjson
import pytest

from streamer.contracts import Source
from streamer.tasks.chat import History, Turn, decode, encode
from tests.sim.kafka import Stored
from tests.sim.machine import BASE_MS, Output, Simulation
from tests.sim.oracle import Event

CONVERSATIONS = 6
TURNS = 5


def say(sim: Simulation, key: str | None, text: str, partition: int) -> str:
    n = len(sim.events)
    doc = {"id": f"e{n}", "key": key, "text": text, "ts": BASE_MS + n}
    offset = sim.cluster.append(partition, Stored(key.encode() if key else None, orjson.dumps(doc),
                                                  sim.cluster_now_ms()))
    sim.events.append(Event(partition, offset, key, BASE_MS + n, text, None if key else "no_key"))
    return f"e{n}"


def interleaved(sim: Simulation) -> dict[str, list[str]]:
    """Every conversation's turns, round-robin (turn 1 of each, then turn 2 of each, ...), a conversation on
    one partition as its Kafka key puts it."""
    turns: dict[str, list[str]] = {f"c{c}": [] for c in range(CONVERSATIONS)}
    for t in range(TURNS):
        for c in range(CONVERSATIONS):
            turns[f"c{c}"].append(say(sim, f"c{c}", f"conversation {c} turn {t}", c % 3))
    return turns


def answered_in_order(sim: Simulation, turns: dict[str, list[str]]) -> None:
    """A reader of the answers sees each conversation's turns first answered in turn order."""
    firsts: dict[str, list[str]] = {}
    for answer in Output(sim.cluster).answers:
        seen = firsts.setdefault(answer["key"], [])
        if answer["id"] not in seen:
            seen.append(answer["id"])
    for key, ids in turns.items():
        assert firsts.get(key, []) == ids[:len(firsts.get(key, []))], f"conversation {key}: {firsts.get(key)}"


def model_turns(sim: Simulation) -> list[str]:
    """The conversations whose turns the model has (summaries aside)."""
    assert sim.instance is not None
    said = (call.request.messages[-1]["content"] for call in sim.instance.pool.pending)
    return [text.split()[1] for text in said if text.startswith("conversation")]


def step(sim: Simulation, finish: int) -> None:
    """Poll, answer up to `finish` requests (the latest first: out of order across conversations), write."""
    assert sim.instance is not None
    sim.poll(batch=500)
    for _ in range(finish):
        if sim.instance.pool.pending:
            sim.instance.pool.finish(-1, ok=True)
        sim.loop.settle()
    if sim.exactly_once:
        sim.loop.advance(0.15)  # a commit interval: the writer's transaction
        sim.end_transaction()
    else:
        sim.deliver(count=1000)
    sim.loop.advance(0.05)


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at least once", "exactly once"])
def test_conversations_run_in_parallel_and_each_one_in_order(sim, exactly_once) -> None:
    sim.configure(shape="chat", exactly_once=exactly_once, lateness_ms=0)
    turns = interleaved(sim)
    sim.poll(batch=500)
    sim.loop.settle()
    running = model_turns(sim)
    assert len(running) > 1 and len(set(running)) == len(running), "one turn per conversation at a time, in parallel"
    for _ in range(40):
        step(sim, finish=3)
    answered_in_order(sim, turns)
    histories = {key: decode(doc) for (_, key), (doc, _) in sim.state.chats.items()}
    assert {key: [i for i, _ in h.answers] for key, h in histories.items()} == turns
    assert all(h.summary for h in histories.values()), "the oldest turns were folded into a summary"


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at least once", "exactly once"])
def test_a_crash_mid_conversation_loses_no_turn_and_repeats_none(sim, exactly_once) -> None:
    sim.configure(shape="chat", exactly_once=exactly_once, lateness_ms=0)
    turns = interleaved(sim)
    sim.settings.kafka.commit_interval_ms = 10_000  # a long uncommitted tail at the crash
    for _ in range(6):
        step(sim, finish=2)
    kept = {i for doc, _ in sim.state.chats.values() for i, _ in decode(doc).answers}
    by_id = {f"e{n}": event for n, event in enumerate(sim.events)}
    replayed = {i for i in kept if by_id[i].offset >= sim.cluster.committed.get(("in", by_id[i].partition), 0)}
    assert replayed and len(kept) < CONVERSATIONS * TURNS, "the crash comes mid-conversation, turns uncommitted"
    sim.crash()
    sim.restart()
    for _ in range(60):
        step(sim, finish=3)
    answered_in_order(sim, turns)
    histories = {key: [i for i, _ in decode(doc).answers] for (_, key), (doc, _) in sim.state.chats.items()}
    assert histories == turns, "every turn once, in order"
    asked = {i: sim.attempts[by_id[i].text] for i in kept}
    assert set(asked.values()) == {1}, "a replayed turn found in the history is answered from it, not by the model"


@pytest.mark.parametrize("kind", ["revoke", "lose"])
def test_a_revoke_mid_conversation_drops_its_waiting_turns_and_the_replay_goes_on_from_the_history(sim, kind) -> None:
    sim.configure(shape="chat", exactly_once=False, lateness_ms=0)
    turns = interleaved(sim)
    step(sim, finish=4)
    step(sim, finish=4)
    handler = sim.instance.pipeline._handler
    assert handler.looking_up > 0, "turns wait for their conversation"
    sim.rebalance(kind, {0, 1})
    step(sim, finish=2)
    sim.rebalance("assign", {0, 1})
    for _ in range(60):
        step(sim, finish=3)
    answered_in_order(sim, turns)
    histories = {key: [i for i, _ in decode(doc).answers] for (_, key), (doc, _) in sim.state.chats.items()}
    assert histories == turns


def test_a_failed_turn_is_a_dead_letter_and_the_conversation_goes_on_without_it(sim) -> None:
    sim.configure(shape="chat", exactly_once=False, lateness_ms=0)
    first = say(sim, "c", "conversation c turn 0", 0)
    failed = say(sim, "c", "conversation c turn 1", 0)
    last = say(sim, "c", "conversation c turn 2", 0)
    step(sim, finish=1)
    sim.instance.pool.finish(0, ok=False)  # turn 1: the model fails it
    sim.loop.settle()
    for _ in range(5):
        step(sim, finish=1)
    out = Output(sim.cluster)
    assert [a["id"] for a in out.answers] == [first, last]
    assert [d["id"] for d in out.letters] == [failed] and out.letters[0]["error"] == "model_error"
    assert [i for i, _ in decode(sim.state.chats[("r", "c")][0]).answers] == [first, last]


def test_a_chat_event_without_a_key_is_a_dead_letter(sim) -> None:
    sim.configure(shape="chat", exactly_once=False, lateness_ms=0)
    say(sim, None, "who am I talking to?", 0)
    step(sim, finish=1)
    assert [d["error"] for d in Output(sim.cluster).letters] == ["no_key"]


def test_a_turn_another_writer_appended_first_is_written_with_that_writers_answer(sim) -> None:
    """A zombie that lost the partition and its new owner answer one turn at once: the second to save finds the
    history moved, reads it again, finds the turn, and writes the first writer's answer; the turn is in the
    history once."""
    sim.configure(shape="chat", exactly_once=False, lateness_ms=0)
    turn = say(sim, "c", "conversation c turn 0", 0)
    sim.poll(batch=500)
    sim.loop.settle()
    assert model_turns(sim) == ["c"]
    theirs = orjson.dumps({**_answer_of(turn), "output": "the zombie's answer"})
    other = History().append(Turn(turn, "conversation c turn 0", "the zombie's answer", 5), theirs.decode(),
                             Source(topic="in", partition=0, offset=0))
    sim.state.chats[("r", "c")] = (encode(other), 1)
    step(sim, finish=1)
    out = Output(sim.cluster)
    assert [a["output"] for a in out.answers] == ["the zombie's answer"]
    assert [i for i, _ in decode(sim.state.chats[("r", "c")][0]).answers] == [turn]


def _answer_of(event_id: str) -> dict[str, object]:
    return {"id": event_id, "key": "c", "task": "chat", "output": "", "model": "sim-model", "tokens_in": 1,
            "tokens_out": 1, "queued_ms": 0.0, "latency_ms": 0.0, "source": {"topic": "in", "partition": 0,
                                                                             "offset": 0},
            "ts_in": BASE_MS, "ts_out": BASE_MS, "meta": None}
