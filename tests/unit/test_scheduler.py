"""The continuous-batching scheduler: deadlines, token budget, admission, preemption, prefix reuse, and pins
that keep a conversation's blocks for its next turn.

Steps are simulated without a model: `run_step` samples token 7 for every sequence that asks.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.engine.blocks import BlockAllocator
from streamer.engine.scheduler import Plan, Scheduler, Sequence


def seq(prompt: int, new: int = 4, deadline: float = 0.0, first: int = 0, **kw: object) -> Sequence:
    return Sequence(list(range(first, first + prompt)), new, deadline, **kw)  # type: ignore[arg-type]


def run_step(s: Scheduler) -> tuple[Plan, list[Sequence]]:
    plan = s.schedule()
    return plan, s.complete(plan, {id(c.seq): 7 for c in plan.chunks if c.sample})


def test_earliest_deadline_is_admitted_first_whatever_the_arrival_order() -> None:
    s = Scheduler(BlockAllocator(64, 4), max_running=1, max_step_tokens=64)
    late, early = seq(4, deadline=9.0), seq(4, deadline=1.0)
    s.add(late)
    s.add(early)
    plan, _ = run_step(s)
    assert [c.seq for c in plan.chunks] == [early]


def test_a_step_never_computes_more_tokens_than_its_budget_and_long_prompts_are_chunked() -> None:
    s = Scheduler(BlockAllocator(64, 4), max_running=8, max_step_tokens=10)
    long = seq(25, new=2)
    s.add(long)
    sizes = []
    while not s.idle:
        plan, _ = run_step(s)
        sizes.append(plan.tokens)
    assert sizes == [10, 10, 5, 1]  # 25 prompt tokens in three chunks, then the second answer token
    assert long.generated == [7, 7]


def test_decodes_keep_running_while_a_long_prompt_is_prefilled_beside_them() -> None:
    s = Scheduler(BlockAllocator(64, 4), max_running=8, max_step_tokens=8)
    short = seq(3, new=5, deadline=0.0)
    s.add(short)
    run_step(s)
    s.add(seq(40, new=1, deadline=1.0, first=100))
    for _ in range(3):
        plan, _ = run_step(s)
        assert plan.chunks[0].seq is short and plan.chunks[0].end - plan.chunks[0].start == 1
        assert plan.tokens == 8  # one decode token + a 7-token slice of the long prompt


def test_sequences_leave_as_soon_as_they_finish_and_free_their_blocks() -> None:
    alloc = BlockAllocator(64, 4)
    s = Scheduler(alloc, max_running=8, max_step_tokens=64)
    short, longer = seq(4, new=1), seq(4, new=3, first=50)
    s.add(short)
    s.add(longer)
    _, done = run_step(s)
    assert done == [short] and short.finished and short.blocks == []
    assert [c.seq for c in s.schedule().chunks] == [longer]


def test_stop_token_ends_a_sequence_before_its_limit() -> None:
    s = Scheduler(BlockAllocator(64, 4), max_running=8, max_step_tokens=64)
    x = seq(4, new=10, stop_ids=frozenset({7}))
    s.add(x)
    _, done = run_step(s)
    assert done == [x] and x.generated == [7]


def test_admission_waits_when_the_cache_is_full_instead_of_failing() -> None:
    s = Scheduler(BlockAllocator(4, 4), max_running=8, max_step_tokens=64)
    first, second = seq(12, new=1), seq(12, new=1, first=100)
    s.add(first)
    s.add(second)
    plan, _ = run_step(s)
    assert [c.seq for c in plan.chunks] == [first]  # 3 blocks used, 1 left: second needs 3
    assert s.waiting == 0 or second not in s.running
    plan, _ = run_step(s)
    assert [c.seq for c in plan.chunks] == [second]


def test_a_sequence_short_of_blocks_preempts_the_latest_deadline_which_is_recomputed_later() -> None:
    alloc = BlockAllocator(5, 2)
    s = Scheduler(alloc, max_running=8, max_step_tokens=64)
    urgent, relaxed = seq(3, new=4, deadline=0.0), seq(3, new=4, deadline=5.0, first=100)
    s.add(urgent)
    s.add(relaxed)
    preempted = []
    while not preempted:  # both grow a block every two tokens; the fifth block goes to the urgent one
        plan, _ = run_step(s)
        preempted = plan.preempted
    assert preempted == [relaxed] and relaxed.preemptions == 1 and relaxed.computed == 0
    assert relaxed not in s.running and urgent in s.running
    while not s.idle:
        run_step(s)
    assert urgent.generated == [7] * 4 and relaxed.generated == [7] * 4, "the preempted one still finished"
    assert alloc.in_use == 0


def test_a_cached_prefix_is_reused_instead_of_computed_again() -> None:
    alloc = BlockAllocator(32, 4)
    s = Scheduler(alloc, max_running=8, max_step_tokens=64)
    shared = list(range(10))  # two full blocks and a partial one
    a = Sequence([*shared, 50, 51], 1, 0.0)
    s.add(a)
    run_step(s)
    b = Sequence([*shared, 60], 1, 0.0)
    s.add(b)
    plan, _ = run_step(s)
    assert b.reused == 8 and plan.chunks[0].start == 8 and plan.tokens == 3


def finish(s: Scheduler, *seqs: Sequence) -> None:
    for x in seqs:
        s.add(x)
    while not s.idle:
        run_step(s)


@pytest.mark.parametrize(("session", "reused"), [("chat", 12), (None, 0)], ids=["pinned", "unpinned"])
def test_a_finished_turn_pins_its_prompt_and_answer_for_its_sessions_next_turn_through_cache_churn(
    session: str | None, reused: int
) -> None:
    alloc = BlockAllocator(8, 4, max_pinned=4)
    s = Scheduler(alloc, max_running=8, max_step_tokens=64)
    turn = Sequence(list(range(10)), 4, 0.0, session=session)
    finish(s, turn)  # 10 prompt + 4 answer tokens: 3 full blocks (the last token's KV is never computed)
    assert alloc.pinned_blocks == (3 if session else 0)
    for other in (100, 200):  # other traffic: 5 blocks each, so the second evicts least recently used ones
        finish(s, Sequence(list(range(other, other + 20)), 1, 0.0))
    after = Sequence([*turn.tokens, 90, 91], 2, 0.0, session=session)
    s.add(after)
    plan, _ = run_step(s)
    assert after.reused == reused and plan.chunks[0].start == reused, "the next turn computes only what is new"
    assert alloc.pins() == {}, "its admission took the pinned blocks and released the pin"


def workload(specs: list[tuple[int, int, float]]) -> list[Sequence]:
    return [Sequence(list(range(i * 3, i * 3 + p)), n, d) for i, (p, n, d) in enumerate(specs)]


def trace(s: Scheduler, seqs: list[Sequence]) -> list[tuple[tuple[int, int, int], ...]]:
    """Each step's chunks as (sequence, start, end), then the sequences preempted."""
    index = {id(x): i for i, x in enumerate(seqs)}
    steps = []
    for _ in range(10_000):
        if s.idle:
            break
        plan, _ = run_step(s)
        steps.append(tuple((index[id(c.seq)], c.start, c.end) for c in plan.chunks)
                     + tuple((index[id(x)], -1, -1) for x in plan.preempted))
    assert s.idle, "the scheduler stalled"
    return steps


@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 6), st.floats(0, 10)), min_size=1, max_size=8),
       st.integers(6, 24), st.integers(1, 40), st.integers(1, 6))
def test_a_cache_full_of_pins_schedules_exactly_like_an_empty_one(
    specs: list[tuple[int, int, float]], num_blocks: int, budget: int, max_running: int
) -> None:
    traces = []
    for pins in (False, True):
        alloc = BlockAllocator(num_blocks, 4, max_pinned=num_blocks)
        s = Scheduler(alloc, max_running, budget)
        if pins:  # finished conversations that never come back hold every block
            for i in range(num_blocks):
                finish(s, Sequence(list(range(10_000 + 4 * i, 10_004 + 4 * i)), 1, 0.0, session=i))
            assert alloc.pinned_blocks == num_blocks and alloc.available == num_blocks
        seqs = [x for x in workload(specs) if s.fits(len(x.tokens) + x.max_new_tokens)]
        for x in seqs:
            s.add(x)
        traces.append(trace(s, seqs))
    assert traces[0] == traces[1], "pins made a sequence wait or be preempted"


def test_the_logits_tail_of_a_label_row_is_never_split_across_steps() -> None:
    s = Scheduler(BlockAllocator(32, 4), max_running=8, max_step_tokens=6)
    row = seq(10, new=0, logits_tail=4)
    s.add(row)
    plan, _ = run_step(s)
    assert (plan.chunks[0].start, plan.chunks[0].end) == (0, 6)
    plan, done = run_step(s)
    assert (plan.chunks[0].start, plan.chunks[0].end, plan.chunks[0].sample) == (6, 10, True) and done == [row]


def test_a_partly_answered_sequence_is_queued_again_when_its_prompt_and_whole_answer_fit() -> None:
    s = Scheduler(BlockAllocator(4, 16), max_running=8, max_step_tokens=64)
    x = seq(30, new=30)  # 60 of the 64 slots
    s.add(x)
    for _ in range(11):
        run_step(s)
    assert len(x.generated) == 11
    s.abort([x])  # its step failed: the engine queues it again
    s.add(x)
    while not s.idle:
        run_step(s)
    assert x.finished and x.generated == [7] * 30


def test_a_request_larger_than_the_whole_cache_is_refused_up_front() -> None:
    s = Scheduler(BlockAllocator(2, 4), max_running=8, max_step_tokens=64)
    assert not s.fits(9) and s.fits(8)


@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 6), st.floats(0, 10)), min_size=1, max_size=12),
       st.integers(6, 24), st.integers(1, 40), st.integers(1, 6))
def test_every_sequence_finishes_with_its_answer_and_no_block_leaks(
    specs: list[tuple[int, int, float]], num_blocks: int, budget: int, max_running: int
) -> None:
    alloc = BlockAllocator(num_blocks, 4)
    s = Scheduler(alloc, max_running, budget)
    seqs = workload(specs)
    admitted = [x for x in seqs if s.fits(len(x.tokens) + x.max_new_tokens)]
    for x in admitted:
        s.add(x)
    for _ in range(10_000):
        if s.idle:
            break
        plan, _ = run_step(s)
        assert plan.tokens <= budget
        used = [b for x in s.running for b in x.blocks]
        assert len(used) == len(set(used)), "a block owned by two sequences with different prompts"
    assert s.idle, "the scheduler stalled"
    assert all(x.finished and len(x.generated) == max(x.max_new_tokens, 0) for x in admitted)
    assert alloc.in_use == 0
