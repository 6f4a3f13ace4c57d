"""The KV block allocator: no block is ever owned twice or lost, prefixes are found again, and a session's
pinned blocks outlive ordinary cache churn but give way before anything would wait for memory."""

from __future__ import annotations

import hashlib
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.engine.blocks import BlockAllocator, OutOfBlocks, block_hashes


def check_invariants(alloc: BlockAllocator, owned: list[int]) -> None:
    free, cached, pinned, refs = alloc.states()
    states = [free, cached, pinned, set(refs)]
    assert sum(map(len, states)) == len(set().union(*states)), "a block is in two states"
    assert set().union(*states) == set(range(alloc.num_blocks)), "a block was lost"
    assert all(n >= 1 for n in refs.values())
    for block in set(owned):
        assert refs[block] == owned.count(block), "the reference count disagrees with the owners"
    pins = alloc.pins()
    held = {block for blocks in pins.values() for block in blocks}
    assert pinned == held - set(refs), "a pinned block nobody owns is not kept, or an unpinned one is"
    assert len(pins) <= alloc.max_pinned
    assert alloc.available == len(free) + len(cached) + len(pinned)


ops = st.lists(st.tuples(st.sampled_from(["allocate", "free", "publish", "lookup", "pin", "unpin"]),
                         st.integers(0, 1000)), max_size=200)


@given(ops, st.integers(1, 12), st.integers(0, 3))
def test_random_operations_never_lose_or_double_own_a_block(script: list[tuple[str, int]], num_blocks: int,
                                                            max_pinned: int) -> None:
    alloc = BlockAllocator(num_blocks, block_size=4, max_pinned=max_pinned)
    owned: list[int] = []  # one entry per reference held by "sequences"
    for op, n in script:
        if op == "allocate":
            try:
                block = alloc.allocate()
            except OutOfBlocks:
                assert alloc.available == 0, "pinned or cached blocks were left while allocation failed"
                continue
            assert block not in owned, "a block handed out while still owned"
            owned.append(block)
        elif op == "free" and owned:
            alloc.free(owned.pop(n % len(owned)))
        elif op == "publish" and owned:
            alloc.publish(owned[n % len(owned)], block_hash=bytes([n % 7]))
        elif op == "lookup":
            block = alloc.lookup(bytes([n % 7]))
            if block is not None:
                owned.append(block)
        elif op == "pin" and owned:
            alloc.pin(f"s{n % 4}", sorted(set(owned))[: n % 5])
        elif op == "unpin":
            alloc.unpin(f"s{n % 4}")
        check_invariants(alloc, owned)
    for block in list(owned):
        alloc.free(block)
    for session in alloc.pins():
        alloc.unpin(session)
    assert alloc.in_use == 0 and alloc.available == num_blocks, "blocks leaked once every owner let go"
    assert alloc.pinned_blocks == 0


def test_a_freed_published_block_is_reused_by_the_next_prompt_with_that_prefix() -> None:
    alloc = BlockAllocator(4, block_size=2)
    block = alloc.allocate()
    alloc.publish(block, b"42")
    alloc.free(block)
    assert alloc.lookup(b"42") == block
    assert alloc.lookup(b"43") is None


def test_cached_blocks_are_evicted_least_recently_used_first_when_fresh_ones_run_out() -> None:
    alloc = BlockAllocator(2, block_size=2)
    a, b = alloc.allocate(), alloc.allocate()
    alloc.publish(a, b"1")
    alloc.publish(b, b"2")
    alloc.free(a)
    alloc.free(b)
    assert alloc.allocate() == a  # a was cached first, so it goes first
    assert alloc.lookup(b"1") is None and alloc.lookup(b"2") == b


def pinned(alloc: BlockAllocator, session: str, count: int, tag: int) -> list[int]:
    """`count` fresh blocks, published, pinned to `session` and then let go by their sequence."""
    blocks = [alloc.allocate() for _ in range(count)]
    for i, block in enumerate(blocks):
        alloc.publish(block, bytes([tag, i]))
    alloc.pin(session, blocks)
    for block in blocks:
        alloc.free(block)
    return blocks


def test_a_pinned_block_survives_cache_churn_that_evicts_an_unpinned_one() -> None:
    alloc = BlockAllocator(3, block_size=2, max_pinned=4)
    kept = pinned(alloc, "chat", 1, tag=1)
    loose = alloc.allocate()
    alloc.publish(loose, b"loose")
    alloc.free(loose)
    fresh = alloc.allocate(), alloc.allocate()  # one free block, then the cached one: never the pinned one
    assert loose in fresh and kept[0] not in fresh
    assert alloc.lookup(bytes([1, 0])) == kept[0]


def test_the_least_recently_pinned_session_is_unpinned_beyond_the_session_limit() -> None:
    alloc = BlockAllocator(8, block_size=2, max_pinned=2)
    a = pinned(alloc, "a", 1, tag=1)
    pinned(alloc, "b", 1, tag=2)
    assert alloc.lookup(bytes([1, 0])) == a[0]  # a's next turn takes its block ...
    alloc.pin("a", a)  # ... and finishes: a is now the most recently pinned
    alloc.free(a[0])
    pinned(alloc, "c", 1, tag=3)
    assert list(alloc.pins()) == ["a", "c"], "b, the least recently pinned, went"
    assert alloc.lookup(bytes([2, 0])) is not None, "b's block is only unpinned: still cached"


def test_under_memory_pressure_pins_give_way_before_allocation_fails() -> None:
    alloc = BlockAllocator(4, block_size=2, max_pinned=4)
    old = pinned(alloc, "old", 2, tag=1)
    new = pinned(alloc, "new", 2, tag=2)
    assert alloc.available == 4 and alloc.in_use == 0
    assert alloc.allocate() == old[1], "the least recently pinned session goes first, its last block first"
    assert list(alloc.pins()) == ["new"]
    got = [alloc.allocate() for _ in range(3)]
    assert set(got) == {old[0], *new} and not alloc.pins()
    with pytest.raises(OutOfBlocks):
        alloc.allocate()


def test_a_pin_on_blocks_running_sequences_own_frees_nothing_and_stays() -> None:
    alloc = BlockAllocator(1, block_size=2, max_pinned=1)
    block = alloc.allocate()
    alloc.pin("chat", [block])
    with pytest.raises(OutOfBlocks):
        alloc.allocate()
    assert alloc.pins() == {"chat": [block]}


def test_only_owned_blocks_can_be_pinned() -> None:
    alloc = BlockAllocator(2, block_size=2, max_pinned=1)
    with pytest.raises(ValueError, match="not in use"):
        alloc.pin("chat", [0])


def test_allocating_past_the_last_block_raises_instead_of_overcommitting() -> None:
    alloc = BlockAllocator(1, block_size=1)
    alloc.allocate()
    with pytest.raises(OutOfBlocks):
        alloc.allocate()


def test_block_hashes_chain_the_prefix_so_equal_blocks_after_different_prefixes_differ() -> None:
    assert block_hashes([1, 2, 3, 4, 5], 2) == block_hashes([1, 2, 3, 4], 2)  # the partial block has no hash
    assert block_hashes([9, 9, 3, 4], 2)[1] != block_hashes([1, 2, 3, 4], 2)[1]
    assert len(block_hashes([1, 2, 3], 4)) == 0


def test_a_block_key_is_the_sha256_of_its_parent_key_and_its_token_ids_so_collisions_cannot_be_searched_for() -> None:
    first, second = block_hashes([1, 2, 3, 4], 2)
    assert first == hashlib.sha256(bytes(32) + array("I", [1, 2]).tobytes()).digest()
    assert second == hashlib.sha256(first + array("I", [3, 4]).tobytes()).digest()


blocks = st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3)


@given(blocks, blocks, st.lists(blocks, max_size=3))
def test_a_key_depends_on_its_block_and_on_every_block_before_it(a: list[int], b: list[int],
                                                                 tail: list[list[int]]) -> None:
    rest = [t for block in tail for t in block]
    keys_a, keys_b = block_hashes([*a, *rest], 3), block_hashes([*b, *rest], 3)
    assert all((x == y) == (a == b) for x, y in zip(keys_a, keys_b, strict=True)), "one different block: new keys"
    assert len(set(keys_a)) == len(keys_a), "a block repeated after another prefix gets another key"
