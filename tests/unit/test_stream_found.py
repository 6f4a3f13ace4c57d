"""Found by an adversarial review of streamed answers: what each reader of the progress was promised, kept.

README "Answers that stream out": the deltas join to the answer unless a gap in `seq` shows text missing, the
last delta and only it is final, a replayed event's Redis stream starts over, and progress never stops the
pipeline (what cannot be written is dropped and counted). `Backend.submit`: the pieces join to the result's
text, unless the last is `BROKEN`."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from types import SimpleNamespace

import pytest
import redis
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from streamer.api import GenerationError, LLMPool
from streamer.config import PartialSettings, RedisSettings
from streamer.engine.backend import BROKEN
from streamer.engine.continuous import ContinuousPool
from streamer.engine.engine import BROKEN_TOKEN, Finished, TokenRequest
from streamer.engine.processes import ProcessEngines, _Report
from streamer.engine.requests import GenRequest
from streamer.engine.worker import LLMWorker
from streamer.observe.metrics import Metrics
from streamer.pipeline.partials import PartialWriter
from streamer.state.redis import RedisState, StateUnavailable

PIECE = json.loads('"Sure \\ud83d"')  # what OpenAIClient._stream_event hands on for a split emoji's first half


def dropped(metrics: Metrics, route: str, reason: str) -> float:
    return metrics.registry.get_sample_value("streamer_partials_dropped_total",
                                             {"route": route, "reason": reason}) or 0.0


class _Topic:
    def __init__(self) -> None:
        self.records: list[bytes] = []

    def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[None]:
        self.records.append(value)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def _run_until_it_dies(writer: PartialWriter, *pieces: str) -> BaseException | None:
    """Drive `PartialWriter.run` (the pipeline's background task, whose death `Pipeline._raise_if_failed`
    re-raises) over pieces; the error it died with, if it did."""

    async def scenario() -> BaseException | None:
        progress = writer.open("e1", "q", None, None)
        for piece in pieces:
            progress.piece(piece)
        progress.finish()
        task = asyncio.create_task(writer.run())
        await asyncio.sleep(0.2)
        if task.done():
            return task.exception()
        task.cancel()
        return None

    return asyncio.run(scenario())


def _entries(url: str, prefix: str, event_id: str) -> list[tuple[int, str, bool, str]]:
    client = redis.Redis.from_url(url)
    try:
        return [(int(f[b"seq"]), f[b"delta"].decode(), f[b"final"] == b"1", f[b"run"].decode())
                for _, f in client.xrange(f"{prefix}:partial:q:{event_id}")]  # route q
    finally:
        client.close()


def _assert_one_run(entries: list[tuple[int, str, bool, str]]) -> None:
    """What a reader of one event's stream is promised: one run, its seq counting up (gaps where deltas were
    dropped, the first ones included), and only the last entry final."""
    assert entries and len({run for *_, run in entries}) == 1, entries
    seqs = [s for s, *_ in entries]
    assert seqs == sorted(set(seqs)), entries
    finals = [f for _, _, f, _ in entries]
    assert finals.count(True) <= 1 and (True not in finals or finals[-1]), entries


# 1. A lone surrogate: the answer path seals it (an `unserializable` dead letter); progress must survive it.

def test_a_lone_surrogate_is_written_to_redis_with_a_replacement_character(redis_url: str) -> None:
    prefix = f"found-{uuid.uuid4().hex[:8]}"

    async def make() -> RedisState:
        return RedisState(RedisSettings(prefix=prefix), redis_url)

    state = asyncio.run(make())
    writer = PartialWriter(PartialSettings(flush_ms=10), state, None, {}, Metrics(), 64)
    assert _run_until_it_dies(writer, PIECE) is None
    assert [(s, d, f) for s, d, f, _ in _entries(redis_url, prefix, "e1")] == [(0, "Sure \ufffd", True)]


def test_a_lone_surrogate_is_produced_with_a_replacement_character() -> None:
    class _Store:
        async def append_partials(self, deltas, ttl_s, maxlen) -> None:
            return None

    topic = _Topic()
    writer = PartialWriter(PartialSettings(flush_ms=10), _Store(), topic.send, {"q": "answers.partial"},
                           Metrics(), 64)
    assert _run_until_it_dies(writer, PIECE) is None
    assert [json.loads(r)["delta"] for r in topic.records] == ["Sure \ufffd"]


def test_a_delta_that_cannot_be_written_is_dropped_and_counted_never_fatal() -> None:
    """Whatever else a store or a producer raises (a bug, a value it refuses): `unwritable`, and the writer runs
    on."""

    class _Store:
        async def append_partials(self, deltas, ttl_s, maxlen) -> None:
            raise ValueError("cannot encode")

    def send(topic: str, key: bytes | None, value: bytes) -> asyncio.Future[None]:
        raise TypeError("refused")

    metrics = Metrics()
    writer = PartialWriter(PartialSettings(flush_ms=10), _Store(), send, {"q": "answers.partial"}, metrics, 64)
    assert _run_until_it_dies(writer, "fine") is None
    assert dropped(metrics, "q", "unwritable") == 2  # the record, then the Redis write


# 2. and 3. Two runs of one event in `partial:{route}:{id}`.

def test_a_replay_in_the_same_process_retires_the_old_run(redis_url: str) -> None:
    """Partitions lost and assigned back to the member while the earlier assignment's request still streams
    (`Pipeline.lost`: in-flight events still finish), and the replay submits the same event again: the older
    run is retired, its later pieces and its final marker dropped (`superseded`), on Redis and Kafka alike."""
    prefix = f"found-{uuid.uuid4().hex[:8]}"
    metrics, topic = Metrics(), _Topic()

    async def scenario() -> None:
        state = RedisState(RedisSettings(prefix=prefix), redis_url)
        writer = PartialWriter(PartialSettings(), state, topic.send, {"q": "answers.partial"}, metrics, 64)
        try:
            old = writer.open("e1", "q", None, None)  # the earlier assignment's request
            old.piece("The answer")
            await writer.flush()
            new = writer.open("e1", "q", None, None)  # the replay, after the partition came back
            old.piece(" is")
            new.piece("The")
            await writer.flush()
            old.piece(" 42.")
            old.finish()  # the old request ends first: its answer is written (idempotently), not its marker
            new.piece(" answer")
            await writer.flush()
            new.finish()
            await writer.flush()
        finally:
            await state.aclose()

    asyncio.run(scenario())
    entries = _entries(redis_url, prefix, "e1")
    _assert_one_run(entries)
    assert [(s, d, f) for s, d, f, _ in entries] == [(0, "The", False), (1, " answer", False), (2, "", True)]
    records = [json.loads(r) for r in topic.records]
    assert [(r["seq"], r["delta"], r["final"]) for r in records] == [
        (0, "The answer", False), (0, "The", False), (1, " answer", False), (2, "", True)]  # the replay from 0
    assert dropped(metrics, "q", "superseded") == 1 + 2  # its marker at retirement; " is", " 42." later


class _FirstWriteFails:
    """Redis drops one write (a blip, or slower than write_timeout_s), then answers again."""

    def __init__(self, state: RedisState) -> None:
        self.state, self.calls = state, 0

    async def append_partials(self, deltas, ttl_s, maxlen) -> None:
        self.calls += 1
        if self.calls == 1:
            raise StateUnavailable("Redis is away for one flush")
        await self.state.append_partials(deltas, ttl_s, maxlen)


def test_a_replay_whose_first_delta_is_dropped_still_replaces_the_old_run(redis_url: str) -> None:
    """Run 1 streamed its whole answer, final marker included, and the process crashed before the commit; the
    restarted one replays the event and its first flush is dropped. Every entry carries its run's token and a
    delta of another run replaces the stream, so the old run still goes: the stream shows the replay alone,
    from seq 1 (the dropped delta is a gap), with one final marker."""
    prefix = f"found-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        state = RedisState(RedisSettings(prefix=prefix), redis_url)
        try:
            before = PartialWriter(PartialSettings(), state, None, {}, Metrics(), 64)  # the crashed process
            run1 = before.open("e1", "q", None, None)
            run1.piece("Hello")
            run1.piece(" world")
            run1.finish()
            await before.flush()
            after = PartialWriter(PartialSettings(), _FirstWriteFails(state), None, {}, Metrics(), 64)  # restart
            run2 = after.open("e1", "q", None, None)
            run2.piece("Hello")
            await after.flush()  # dropped
            run2.piece(" world")
            await after.flush()
            run2.finish()
            await after.flush()
        finally:
            await state.aclose()

    asyncio.run(scenario())
    entries = _entries(redis_url, prefix, "e1")
    _assert_one_run(entries)
    assert [(s, d, f) for s, d, f, _ in entries] == [(1, " world", False), (2, "", True)]


# 4. and 5. The continuous engine's pieces against its answer, and the worker processes' retry.

def byte_level() -> Tokenizer:
    """A byte-level BPE without merges (GPT-2/SmolLM2-style bytes): one token per UTF-8 byte."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class _Worker:
    """The LLMWorker's own decode and gen_result over a byte-level tokenizer."""

    decode = LLMWorker.decode
    gen_result = LLMWorker.gen_result

    def __init__(self) -> None:
        self.tokenizer = byte_level()
        self._tokenizer_lock = threading.Lock()
        self.eos_ids: frozenset[int] = frozenset({10_000})

    def prompt_ids(self, chats):
        return [[1, 2, 3] for _ in chats]


class _Engine:
    """Generates a scripted row of tokens, one per step, like Engine (on_token per token; `tokens_seen`
    overrides what on_token hears, as ProcessEngines may)."""

    def __init__(self, row: list[int], tokens_seen: list[int] | None = None) -> None:
        self.row, self.seen = row, tokens_seen if tokens_seen is not None else row
        self.on_token: Callable[[Hashable, int], None] | None = None
        self.jobs: dict[Hashable, list[int]] = {}
        self.last_step_size = 0
        self.alive, self.waiting = True, 0

    @property
    def idle(self) -> bool:
        return not self.jobs

    def kv_usage(self):
        return (0, 0, 0)

    def add(self, key, request: TokenRequest, deadline_s: float) -> None:
        self.jobs[key] = []

    def step(self) -> list[Finished]:
        done = []
        for key, out in list(self.jobs.items()):
            out.append(self.row[len(out)])
            assert self.on_token is not None
            if len(out) <= len(self.seen):
                self.on_token(key, self.seen[len(out) - 1])
            if len(out) == len(self.row):
                del self.jobs[key]
                done.append(Finished(key, out, [], time.monotonic(), time.monotonic(), len(out)))
        self.last_step_size = len(done)
        return done


def _stream(engine: _Engine, worker: _Worker, n: int) -> tuple[list[str], str]:
    async def scenario() -> tuple[list[str], str]:
        pool = ContinuousPool(engine, worker, max_queue=4, default_deadline_ms=60_000)  # type: ignore[arg-type]
        await pool.start()
        pieces: list[str] = []
        try:
            done = await pool.submit(GenRequest(({"role": "user", "content": "hi"},), max_new_tokens=n),
                                     on_piece=pieces.append)
        finally:
            await pool.aclose()
        return pieces, done.result.text  # type: ignore[union-attr]

    return asyncio.run(scenario())


def test_an_answer_cut_inside_a_character_streams_all_of_the_answer() -> None:
    """max_new_tokens ends the answer after 2 of an emoji's 4 byte tokens: the answer ends in U+FFFD, which
    `_piece` held back waiting for the next byte; the end of the answer is handed on when it resolves."""
    worker = _Worker()
    row = worker.tokenizer.encode("Sure 😀").ids[: len("Sure ") + 2]
    pieces, answer = _stream(_Engine(row), worker, len(row))
    assert "".join(pieces) == answer and answer.endswith("\ufffd"), (pieces, answer)


def test_an_answer_that_does_not_continue_what_was_shown_ends_the_pieces_broken() -> None:
    """The engine streamed tokens that do not lead to the answer (a diverged retry): the pieces end with
    BROKEN, nothing of the answer is handed on after it, and the answer is the engine's."""
    worker = _Worker()
    row = worker.tokenizer.encode("Hello").ids
    seen = [*worker.tokenizer.encode("Help").ids[:3], BROKEN_TOKEN]
    pieces, answer = _stream(_Engine(row, seen), worker, len(row))
    assert answer == "Hello" and pieces[-1] is BROKEN and "".join(pieces) == "Hel", (pieces, answer)


def test_a_broken_stream_ends_in_a_final_marker_with_a_gap() -> None:
    """The partial writer marks a BROKEN piece's event as missing text: its final marker skips a seq."""

    class _Store:
        def __init__(self) -> None:
            self.deltas: list = []

        async def append_partials(self, deltas, ttl_s, maxlen) -> None:
            self.deltas += deltas

    async def scenario() -> list:
        store = _Store()
        writer = PartialWriter(PartialSettings(), store, None, {}, Metrics(), 64)
        progress = writer.open("e1", "q", None, None)
        progress.piece("Hel")
        await writer.flush()
        progress.piece(BROKEN)
        progress.piece("lo")  # no backend hands more after BROKEN; were it to, it would not join either
        progress.finish()
        await writer.flush()
        return store.deltas

    deltas = asyncio.run(scenario())
    assert [(d.seq, d.delta, d.final) for d in deltas] == [(0, "Hel", False), (2, "", True)]


def test_a_retry_on_another_worker_process_that_diverges_breaks_the_stream_not_the_answer() -> None:
    """engine.workers > 1, a sampled event: the child running it dies after 3 tokens; the retry on another
    child samples other tokens. The tokens streamed stop at the first attempt's head and end in BROKEN_TOKEN
    (no splice of two answers); the answer is the retry's, whole."""
    engines = ProcessEngines.__new__(ProcessEngines)
    streamed: list[int] = []
    engines.on_token = lambda key, token: streamed.append(token)
    engines.last_step_size, engines.restarts = 0, 0
    engines._pending, engines._parked, engines._suspects, engines._suspect = {}, [], collections.deque(), None

    def child() -> SimpleNamespace:
        return SimpleNamespace(alive=True, ready=True, load=0, routed=0, waiting=0, kv=(0, 0, 0), backoff_s=1.0,
                               respawn_at=None, process=SimpleNamespace(pid=1, exitcode=None),
                               inbox=SimpleNamespace(put=lambda item: None), release=lambda: None)

    def retried(retry: list[int]) -> list[list[int]]:
        streamed.clear()
        first, second = child(), child()
        engines._children = [first, second]
        engines.add("k", TokenRequest((1, 2, 3), 6, 0.8, frozenset()), time.monotonic() + 60)
        routed_to = engines._pending["k"].child
        other = second if routed_to is first else first
        engines._take(routed_to, _Report([], [("k", t) for t in (11, 12, 13)], 0, 1, (0, 0, 0)))  # attempt 1
        routed_to.process.exitcode = -9
        assert engines._bury(routed_to) == []  # retried elsewhere
        assert engines._pending["k"].child is other
        done = engines._take(other, _Report([Finished("k", retry, [], 0.0, 0.0, 6)], [("k", t) for t in retry],
                                            0, 1, (0, 0, 0)))
        return [f.tokens for f in done]

    assert retried([21, 22, 23, 24, 25, 26]) == [[21, 22, 23, 24, 25, 26]]
    assert streamed == [11, 12, 13, BROKEN_TOKEN]
    assert retried([11, 12, 23, 24, 25, 26]) == [[11, 12, 23, 24, 25, 26]]  # diverges at the third
    assert streamed == [11, 12, 13, BROKEN_TOKEN]
    assert retried([11, 12, 13, 14, 15, 16]) == [[11, 12, 13, 14, 15, 16]]  # greedy: repeats, then goes on
    assert streamed == [11, 12, 13, 14, 15, 16]


def test_a_broken_stream_is_an_error_to_a_client_of_the_pool() -> None:
    """`LLMPool.stream` (the OpenAI-compatible server's source) never shows text that does not lead to the
    answer as if it did: BROKEN raises GenerationError (the server answers 500), as the openai backend's
    `_Diverged` does."""
    class _Backend:
        async def stream(self, request, deadline_ms=None):
            yield "Hel"
            yield BROKEN

    async def scenario() -> list[str]:
        pool = LLMPool(_Backend())  # type: ignore[arg-type]
        pool._started = True
        shown = []
        with pytest.raises(GenerationError, match="broke"):
            async for item in pool.stream("hi"):
                shown.append(item)
        return shown

    assert asyncio.run(scenario()) == ["Hel"]
