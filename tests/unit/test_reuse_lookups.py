"""Answers reused on replay (streamer/pipeline/reuse.py): what the digest covers, and how look-ups are
batched, counted against the consume loop's room, and turned into model calls when Redis cannot help."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from streamer.config import Route
from streamer.contracts import InputEvent, Params
from streamer.pipeline.reuse import Lookup, Reuse, digest
from streamer.state.keys import Keys
from streamer.state.redis import StateUnavailable, Stored
from streamer.tasks.event import task_of
from tests.sim.model import SimPool

ROUTE = Route(name="qa", input="in", output="out", task="classify", labels=["pos", "neg"])
EVENT = InputEvent(id="q1", text="great", key="k", ts=1, meta={"a": 1})


def kept(route: Route = ROUTE, event: InputEvent = EVENT, model: str = "m", cap: int = 256) -> str | None:
    """The digest the event handler computes: over the request the model would get."""
    task = task_of(event, route)
    assert task.request is not None
    return digest(model, route.name, task.name, task.request(event, route, cap), event)


def test_the_digest_covers_what_shapes_the_answer_and_not_when_or_where_it_came() -> None:
    same = kept()
    assert same == kept(event=EVENT.model_copy(update={"ts": 2}))
    assert same == kept(event=EVENT.model_copy(update={"params": Params(deadline_ms=5)}))
    assert same == kept(route=ROUTE.model_copy(update={"slo_ms": 9, "output": "other"}))
    assert same == kept(cap=128), "a scored label has no token cap"
    answering = ROUTE.model_copy(update={"task": "answer"})
    changed = [
        kept(model="other-model"),
        kept(route=ROUTE.model_copy(update={"name": "qb"})),
        kept(route=ROUTE.model_copy(update={"labels": ["pos", "neg", "mixed"]})),
        kept(route=ROUTE.model_copy(update={"system_prompt": "be terse"})),
        kept(event=EVENT.model_copy(update={"text": "awful"})),
        kept(event=EVENT.model_copy(update={"key": "other"})),
        kept(event=EVENT.model_copy(update={"meta": {"a": 2}})),
        kept(route=answering),
        kept(route=answering, cap=16),
        kept(route=answering.model_copy(update={"max_new_tokens": 8})),
        kept(route=answering, event=EVENT.model_copy(update={"params": Params(temperature=0.7)})),
    ]
    assert same not in changed and len(set(changed)) == len(changed)
    assert kept(event=EVENT.model_copy(update={"task": "answer"})) == kept(route=answering), "the same request"


def test_routes_cannot_share_a_reuse_key() -> None:
    keys = Keys("p")
    assert keys.reuse("qa", "q1") == "p:reuse:qa:q1"
    pairs = [("a:b", "c"), ("a", "b:c"), ("a\\", ":c"), ("a\\:", "c"), ("a", "\\:c")]
    assert len({keys.reuse(route, event_id) for route, event_id in pairs}) == len(pairs)


class Store:
    """Kept answers in a dict; counts round trips."""

    def __init__(self, kept: dict[tuple[str, str], Stored], failure: Exception | None = None,
                 hang: bool = False) -> None:
        self.kept, self.failure, self.hang = kept, failure, hang
        self.calls: list[list[tuple[str, str]]] = []

    async def stored_answers(self, wanted: Sequence[tuple[str, str]]) -> list[Stored | None]:
        self.calls.append(list(wanted))
        if self.hang:
            await asyncio.Event().wait()
        if self.failure is not None:
            raise self.failure
        return [self.kept.get(pair) for pair in wanted]


class Outcomes:
    def __init__(self) -> None:
        self.hits: list[str] = []
        self.misses: list[str] = []

    def lookup(self, event_id: str, kept: str = "d", usable: bool = True) -> Lookup:
        def hit(stored: Stored) -> bool:
            if usable:
                self.hits.append(event_id)
            return usable

        return Lookup("qa", event_id, kept, hit=hit, miss=lambda: self.misses.append(event_id))


async def started_pool(max_queue: int = 8) -> SimPool:
    pool = SimPool(max_queue)
    await pool.start()
    return pool


async def test_one_poll_is_looked_up_in_one_round_trip_and_counts_against_the_room_until_resolved() -> None:
    store = Store({("qa", "a"): Stored("d", b"A"), ("qa", "b"): Stored("old", b"B"), ("qa", "c"): Stored("d", b"C")})
    reuse, seen = Reuse(store, await started_pool()), Outcomes()
    for event_id, usable in (("a", True), ("b", True), ("c", False), ("d", True)):
        reuse.ask(seen.lookup(event_id, usable=usable))
    assert reuse.pending == 4 and store.calls == []
    reuse.flush()
    await reuse.drain()
    assert store.calls == [[("qa", "a"), ("qa", "b"), ("qa", "c"), ("qa", "d")]]
    assert seen.hits == ["a"]
    assert seen.misses == ["b", "c", "d"]  # a changed digest, an unusable kept answer, none kept
    assert reuse.pending == 0


@pytest.mark.parametrize("store", [Store({}, failure=StateUnavailable("Connection refused")),
                                   Store({}, failure=RuntimeError("NOPERM")), Store({}, hang=True)],
                         ids=["redis away", "redis refuses", "redis hangs"])
async def test_redis_that_cannot_answer_a_look_up_is_a_miss_for_the_whole_batch(store) -> None:
    reuse, seen = Reuse(store, await started_pool(), timeout_s=0.05), Outcomes()
    reuse.ask(seen.lookup("a"))
    reuse.ask(seen.lookup("b"))
    reuse.flush()
    await asyncio.wait_for(reuse.drain(), 5)
    assert seen.misses == ["a", "b"] and seen.hits == []


async def test_a_miss_waits_for_a_free_slot_of_the_model_queue() -> None:
    pool = await started_pool(max_queue=1)
    request = task_of(EVENT, ROUTE).request
    assert request is not None
    pool.submit(request(EVENT, ROUTE, 8))  # a window's summary, say, took the last slot meanwhile
    reuse, seen = Reuse(Store({}), pool), Outcomes()
    reuse.ask(seen.lookup("a"))
    reuse.flush()
    await asyncio.sleep(0.01)
    assert seen.misses == [] and reuse.pending == 1
    pool.finish(0, ok=True)
    await asyncio.wait_for(reuse.drain(), 5)
    assert seen.misses == ["a"] and reuse.pending == 0


async def test_a_bug_after_the_look_up_is_kept_for_the_pipeline_to_stop_with() -> None:
    reuse = Reuse(Store({}), await started_pool())

    def broken() -> None:
        raise KeyError("bug")

    reuse.ask(Lookup("qa", "a", "d", hit=lambda stored: True, miss=broken))
    reuse.flush()
    await reuse.drain()  # the shutdown goes on: the consume loop raises the failure
    assert isinstance(reuse.failure, KeyError)
