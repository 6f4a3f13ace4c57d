"""Conversations (`task: chat`): the turns of one conversation answered strictly in order, different
conversations in parallel.

A turn's prompt is its conversation's history plus its text, and the history holds the previous turn's
reply, so a turn cannot be built when it is consumed: it waits behind its conversation's turn in progress
(`KeyedQueues`, per (route, key)) while its part in the OffsetTracker holds its offset, as any unanswered
event's does. A turn, once out:

1. reads the history from Redis (`ChatStore`). A turn already in it (a replay) is answered with the answer
   record first written, with no model call; one the history has moved past (a turn after it on its
   partition was appended: it was dead-lettered, or answered longer ago than the kept answers) is a
   `stale_turn` dead letter, so a replay never appends a turn out of order;
2. folds the oldest turns into the running summary where the history is over `max_history_tokens` (one
   model call over the old summary and those turns; where the model fails it or answers nothing, those turns
   are dropped and the old summary stays: a greedy model fails that same request every time, so a dead letter
   that left the history as it was would dead-letter every later turn of the conversation too);
3. asks the model, under the conversation's `session` (an engine keeps its KV prefix);
4. appends the turn to the history, then hands the answer to the writer. Every change is saved only over
   the revision it was read at (a zombie and the partition's new owner cannot both append a turn: the
   second finds it and writes the first's answer), and a dead-lettered turn is not appended: the next turn
   goes on without it.

So the history is written before the answer: a crash in between replays the turn, which finds itself in the
history. The next turn starts once the history holds this one; the answer's own record and state are the
writer's, and commit as every answer's do. Chat turns bypass the answer-reuse cache
(`streamer.pipeline.reuse`): its digest is of the request, which only exists once the history is read,
and the history already keeps each turn's answer.

A revoked partition's waiting turns are dropped without a commit (its new owner replays them and reads the
history from Redis); a turn out when its partition goes stops before the model if it can.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from streamer.config import Route
from streamer.contracts import Answer, ErrorCode, InputEvent
from streamer.engine.backend import Backend
from streamer.engine.requests import Generated, GenRequest, GenResult
from streamer.kafka.offsets import TP, OffsetTracker, Ref
from streamer.outcomes import Outcome
from streamer.pipeline.keyed import KeyedQueues
from streamer.pipeline.parse import RawMessage
from streamer.pipeline.writer import Outputs
from streamer.state.retry import retrying
from streamer.tasks.chat import (
    History,
    Turn,
    asked_of,
    decode,
    encode,
    reply_request,
    summary_cap,
    summary_request,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingTurn:
    """A consumed chat event waiting for its conversation's turn."""

    event: InputEvent
    route: Route
    raw: RawMessage
    ref: Ref
    arrived_s: float

    @property
    def key(self) -> str:
        assert self.event.key is not None  # the handler dead-letters a keyless chat event
        return self.event.key


class ChatStore(Protocol):
    """Where histories live (`streamer.state.redis.RedisState`)."""

    async def conversation(self, route: str, key: str) -> tuple[bytes | None, int]: ...

    async def save_conversation(self, route: str, key: str, doc: bytes, rev: int) -> bool: ...


class TurnHost(Protocol):
    """What answering a turn needs of the event handler: the model call and outcomes every answer has."""

    def submit(self, turn: PendingTurn, request: GenRequest, out: Outputs) -> asyncio.Future[Generated]:
        """Ask the model; the turn's one outcome (answer or dead letter) goes to `out`."""
        ...

    def replay(self, turn: PendingTurn, answer: bytes) -> bool:
        """Answer the turn with an answer record first written; False: it is not one (ask the model)."""
        ...

    def dead(self, turn: PendingTurn, code: ErrorCode, detail: str) -> None: ...


class Conversations:
    """Runs each conversation's turns in order, one task per conversation with a turn out."""

    def __init__(self, store: ChatStore, pool: Backend, host: TurnHost, writer: Outputs, tracker: OffsetTracker,
                 cap: int) -> None:
        """`cap`: `limits.max_new_tokens`, of replies and summaries."""
        self._store, self._pool, self._host, self._writer, self._tracker = store, pool, host, writer, tracker
        self._cap = cap
        self._queues: KeyedQueues[tuple[str, str], PendingTurn] = KeyedQueues()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending = 0
        self.failure: BaseException | None = None
        """A bug answering a turn: the pipeline stops with it rather than stall the conversation."""

    @property
    def pending(self) -> int:
        """Turns consumed and not yet handed to the model or finished: the room the consume loop polls for
        counts them, so one long conversation pauses the input instead of queueing without bound."""
        return self._pending

    def accept(self, turn: PendingTurn) -> None:
        self._pending += 1
        if self._queues.push((turn.route.name, turn.key), turn):
            task = asyncio.get_running_loop().create_task(self._run(turn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def forget(self, tps: Iterable[TP]) -> None:
        """Partitions went away: their waiting turns are dropped, uncommitted; the new owner replays them."""
        gone = set(tps)
        self._pending -= self._queues.drop(lambda turn: turn.ref.tp in gone)

    async def drain(self) -> None:
        """Shutdown: no turn starts any more (waiting ones are replayed after the restart); those out finish."""
        self._pending -= self._queues.drop(lambda turn: True)
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, turn: PendingTurn | None) -> None:
        try:
            while turn is not None:
                await self._answer(turn)
                turn = self._queues.next((turn.route.name, turn.key))
        except Exception as exc:
            self.failure = exc
            raise

    async def _answer(self, turn: PendingTurn) -> None:
        handed = False
        try:
            found = await self._prepare(turn)
            if found is None or not self._tracker.current(turn.ref):  # finished, or its partition is gone
                return
            history, rev = found
            request = reply_request(turn.event, turn.route, self._cap, history)
            while self._pool.free_slots() <= 0:
                await self._pool.wait_for_room()
            held = _Held()
            self._pending -= 1
            handed = True
            future = self._host.submit(turn, request, held)
            outcome = await held.outcome
            if not isinstance(outcome.record, Answer):  # a dead letter is not a turn of the conversation
                self._writer.add(outcome)
                return
            result = future.result().result
            text = result.text if isinstance(result, GenResult) else ""
            said = Turn(turn.event.id, turn.event.text, text,
                        self._pool.count_tokens(turn.event.text) + self._pool.count_tokens(text))
            await self._append(turn, said, outcome, history, rev)
        finally:
            if not handed:
                self._pending -= 1

    async def _prepare(self, turn: PendingTurn) -> tuple[History, int] | None:
        """The history to answer the turn from, folded to its budget; None: the turn is finished already
        (answered from the history, or dead-lettered)."""
        history, rev = await self._read(turn)
        while True:
            if self._finished(turn, history):
                return None
            fold = history.overflow(turn.route.max_history_tokens, summary_cap(turn.route, self._cap))
            if not fold:
                return history, rev
            summary = await self._summarise(turn, history, fold)
            if summary is None:  # a greedy model fails this request every time: drop the turns, keep the old summary
                log.warning("conversation %s of route %s: its oldest %d turns are dropped without a summary",
                            turn.key, turn.route.name, fold)
                folded = history.fold(fold, history.summary, history.summary_tokens)
            else:
                folded = history.fold(fold, summary, self._pool.count_tokens(summary))
            if await self._save(turn, folded, rev):
                history, rev = folded, rev + 1
            else:
                history, rev = await self._read(turn)  # another writer moved it: look again

    def _finished(self, turn: PendingTurn, history: History) -> bool:
        """Whether the history already settles the turn: answered before (its first answer is written
        again), or passed (a dead letter: appending it now would put it out of order)."""
        kept = history.answer_of(turn.event.id, asked_of(turn.event))
        if kept is not None and self._host.replay(turn, kept.encode()):
            return True
        if history.behind(turn.raw.source):
            self._host.dead(turn, ErrorCode.STALE_TURN,
                            "the conversation's history has moved past this turn: it was dead-lettered before, or "
                            "answered longer ago than the latest answers kept")
            return True
        return False

    async def _append(self, turn: PendingTurn, said: Turn, outcome: Outcome, history: History, rev: int) -> None:
        """The turn into the history, then its answer to the writer; where another writer appended it first,
        that writer's answer is the one written."""
        source, asked = turn.raw.source, asked_of(turn.event)
        while not await self._save(turn, history.append(said, outcome.payload.decode(), source, asked), rev):
            history, rev = await self._read(turn)
            kept = history.answer_of(said.id, asked)
            if kept is not None and self._host.replay(turn, kept.encode()):
                return
            if history.behind(source):  # passed meanwhile: answered, but not part of the conversation
                break
        self._writer.add(outcome)

    async def _summarise(self, turn: PendingTurn, history: History, fold: int) -> str | None:
        """The new running summary of the old one and the oldest `fold` turns; None when the model failed."""
        try:
            generated = await self._pool.generate(summary_request(history, fold, turn.route, self._cap))
        except Exception:  # the pool already split and retried: the model failed this request
            log.warning("summarising conversation %s of route %s failed", turn.key, turn.route.name, exc_info=True)
            return None
        result = generated.result
        if result.error is not None or not isinstance(result, GenResult):
            return None
        return result.text.strip() or None

    async def _read(self, turn: PendingTurn) -> tuple[History, int]:
        doc, rev = await retrying("conversation read",
                                  lambda: self._store.conversation(turn.route.name, turn.key))
        return decode(doc), rev

    async def _save(self, turn: PendingTurn, history: History, rev: int) -> bool:
        return await retrying("conversation write", lambda: self._store.save_conversation(
            turn.route.name, turn.key, encode(history), rev))


class _Held:
    """Catches the one outcome of a turn's model call, so the history is written before the writer sees it."""

    def __init__(self) -> None:
        self.outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    def add(self, outcome: Outcome) -> None:
        self.outcome.set_result(outcome)
