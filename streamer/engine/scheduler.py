"""Continuous-batching scheduler: which tokens of which sequences the next model step computes.

Every step is re-planned, so sequences join between decode steps and leave the moment they finish;
a long answer never holds a short one back. One rule covers prefill and decode: a running sequence
needs the KV of `tokens[computed:]`; in decode that is the one token sampled last step, in prefill a
chunk of the prompt. Per step:

1. running sequences, earliest deadline first, each take their next chunk within `max_step_tokens`
   (decodes cost one token, so a long prompt is prefilled in chunks around them, never stalling them);
2. a sequence that needs a new KV block when none is left preempts the running sequence with the
   latest deadline (its blocks are freed and it is recomputed later: preemption by recompute);
3. waiting sequences are admitted earliest deadline first while there is room in the batch, in the
   token budget and in the cache (with one block held back per running sequence for its growth);
   the full blocks of a prompt already in the prefix cache are taken instead of computed.

A sequence with a `session` (a conversation) pins its full blocks, prompt and answer, when it finishes:
the session's next turn starts with them, and its admission takes them and releases the pin.

Pure bookkeeping over the block allocator, no tensors: the engine runs the plan and reports back.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from streamer.engine.blocks import BlockAllocator, OutOfBlocks, block_hashes


@dataclass(eq=False)
class Sequence:
    """One request's tokens and cache blocks; `tokens` grows as the engine samples."""

    tokens: list[int]
    max_new_tokens: int
    deadline_s: float
    stop_ids: frozenset[int] = frozenset()
    logits_tail: int = 1  # positions at the end of the prompt whose logits the caller needs
    payload: object = None  # the engine's request, carried through untouched
    session: Hashable | None = None  # the conversation whose next turn reuses this sequence's blocks
    prompt_len: int = field(init=False)
    computed: int = 0  # leading tokens whose KV is in the cache
    blocks: list[int] = field(default_factory=list)
    published: int = 0  # leading blocks registered in the prefix cache
    reused: int = 0  # prompt tokens taken from the prefix cache at the last admission
    preemptions: int = 0
    finished: bool = False

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a sequence needs at least one prompt token")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 1 <= self.logits_tail <= len(self.tokens):
            raise ValueError(f"logits_tail must be in [1, {len(self.tokens)}], got {self.logits_tail}")
        self.prompt_len = len(self.tokens)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def pending(self) -> int:
        """Tokens whose KV the next step could compute."""
        return len(self.tokens) - self.computed


@dataclass(frozen=True)
class Chunk:
    """Compute KV for `seq.tokens[start:end]`; `sample` when that reaches the sequence's last token
    (fixed at planning: the sampled token is appended to `seq.tokens` afterwards)."""

    seq: Sequence
    start: int
    end: int
    sample: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample", self.end == len(self.seq.tokens))


@dataclass(frozen=True)
class Plan:
    chunks: list[Chunk]
    preempted: list[Sequence]

    @property
    def tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_running: int, max_step_tokens: int) -> None:
        """Both limits may change between steps (the engine sizes steps from measured latency)."""
        if max_running < 1 or max_step_tokens < 1:
            raise ValueError(f"limits must be >= 1, got {max_running}, {max_step_tokens}")
        self.allocator = allocator
        self.max_running = max_running
        self.max_step_tokens = max_step_tokens
        self.reused_tokens = 0  # prompt tokens taken from the prefix cache instead of computed, in total
        self.running: list[Sequence] = []
        self._waiting: list[tuple[float, int, Sequence]] = []  # heap by (deadline, arrival order)
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self.running and not self._waiting

    def sequences(self) -> list[Sequence]:
        """Every sequence not finished: running, then waiting."""
        return self.running + [w[2] for w in self._waiting]

    def fits(self, total_tokens: int) -> bool:
        """Whether a sequence of this many tokens (prompt + answer) can ever be held by the cache."""
        return self._blocks_for(total_tokens) <= self.allocator.num_blocks

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence, or one queued again after a failed step with part of its answer in
        `tokens`: either way it holds at most its prompt plus its whole answer."""
        if not self.fits(seq.prompt_len + seq.max_new_tokens):
            raise OutOfBlocks(f"{seq.prompt_len} + {seq.max_new_tokens} tokens exceed the whole KV cache")
        heapq.heappush(self._waiting, (seq.deadline_s, next(self._order), seq))

    def schedule(self) -> Plan:
        """The next step's chunks; sequences preempted on the way are back in the waiting queue."""
        budget = self.max_step_tokens
        chunks: list[Chunk] = []
        preempted: list[Sequence] = []
        queue = sorted(self.running, key=lambda s: s.deadline_s)
        while queue and budget > 0:
            seq = queue.pop(0)
            end = self._chunk_end(seq, budget)
            if not self._grow(seq, end, queue, preempted):
                continue
            chunks.append(Chunk(seq, seq.computed, end))
            budget -= end - seq.computed
        while budget > 0 and not preempted and self._waiting and len(self.running) < self.max_running:
            seq = self._waiting[0][2]
            if not self._admit(seq, budget):
                break
            heapq.heappop(self._waiting)
            self.running.append(seq)
            end = self._chunk_end(seq, budget)
            chunks.append(Chunk(seq, seq.computed, end))
            budget -= end - seq.computed
        return Plan(chunks, preempted)

    def complete(self, plan: Plan, sampled: dict[int, int]) -> list[Sequence]:
        """Record a step's results: `sampled[id(seq)]` is the token sampled for each sampling chunk.

        Returns the sequences that finished (their blocks are released, full ones stay cached).
        """
        finished: list[Sequence] = []
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.computed = chunk.end
            self._publish(seq)
            if not chunk.sample:
                continue
            token = sampled.get(id(seq))
            if token is None or seq.max_new_tokens == 0:
                finished.append(seq)
                continue
            seq.tokens.append(token)
            if token in seq.stop_ids or len(seq.tokens) - seq.prompt_len >= seq.max_new_tokens:
                finished.append(seq)
        for seq in finished:
            if seq.session is not None:
                self.allocator.pin(seq.session, seq.blocks[: seq.published])
            self._release(seq)
            seq.finished = True
        return finished

    def abort(self, seqs: Iterable[Sequence]) -> None:
        """Drop sequences wherever they are (their step failed); blocks go back to the allocator."""
        doomed = {id(s) for s in seqs}
        self._waiting = [w for w in self._waiting if id(w[2]) not in doomed]
        heapq.heapify(self._waiting)
        for seq in [s for s in self.running if id(s) in doomed]:
            self._release(seq)

    def _chunk_end(self, seq: Sequence, budget: int) -> int:
        """How far this step computes: all pending tokens, or a chunk that stops before the logits tail.

        The tail (the positions whose logits are needed) is never split across steps, even if that
        overruns the budget by a few tokens, since logits are read in the step that computes them.
        """
        tail_start = len(seq.tokens) - seq.logits_tail
        if seq.pending <= budget or tail_start <= seq.computed:
            return len(seq.tokens)
        return min(seq.computed + budget, tail_start)

    def _grow(self, seq: Sequence, end: int, later: list[Sequence], preempted: list[Sequence]) -> bool:
        """Own blocks for `end` tokens; when none is left, preempt the latest-deadline sequence not yet
        planned this step (`later`, sorted by deadline), or `seq` itself if it is the latest. False if it was."""
        while len(seq.blocks) < self._blocks_for(end):
            try:
                seq.blocks.append(self.allocator.allocate())
            except OutOfBlocks:
                victim = later.pop() if later else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    return False
        return True

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Take cached prefix blocks and the first chunk's blocks, or take nothing and wait."""
        hashes = block_hashes(seq.tokens[: len(seq.tokens) - seq.logits_tail], self.allocator.block_size)
        hits: list[int] = []
        for h in hashes:
            block = self.allocator.lookup(h)
            if block is None:
                break
            hits.append(block)
        seq.blocks = hits
        seq.computed = seq.reused = len(hits) * self.allocator.block_size
        seq.published = len(hits)
        end = self._chunk_end(seq, budget)
        need = self._blocks_for(end) - len(hits)
        if need > self.allocator.available - len(self.running):
            self._release(seq)
            return False
        seq.blocks.extend(self.allocator.allocate() for _ in range(need))
        self.reused_tokens += seq.reused
        if seq.session is not None:
            self.allocator.unpin(seq.session)  # what matched is taken; the rest may go
        return True

    def _publish(self, seq: Sequence) -> None:
        """Register blocks that just became full, so later prompts with this prefix reuse them."""
        full = seq.computed // self.allocator.block_size
        if full <= seq.published:
            return
        hashes = block_hashes(seq.tokens[: full * self.allocator.block_size], self.allocator.block_size)
        for i in range(seq.published, full):
            self.allocator.publish(seq.blocks[i], hashes[i])
        seq.published = full

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it again; it will recompute prompt + answer so far."""
        self._release(seq)
        seq.preemptions += 1
        heapq.heappush(self._waiting, (seq.deadline_s, next(self._order), seq))

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        for block in seq.blocks:
            self.allocator.free(block)
        seq.blocks = []
        seq.computed = seq.published = 0

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.allocator.block_size)
