"""The async front end of the continuous-batching engine.

Callers on the event loop submit requests; one engine thread takes whatever arrived between two
steps, runs the next step (torch releases the GIL while it computes, so Kafka polling and Redis
writes go on) and hands finished results back to the loop. A request joins the running batch at the
next step instead of waiting for a batch to form or to finish.

Backpressure is the same contract as the static pool's: at most `max_queue` requests are queued or
running; `submit` raises QueueFull beyond that and `wait_for_room()` says when to resume.

A request the engine raises on is answered with the error; any other exception in the engine thread
is a bug that fails every caller and turns `alive` false (readiness).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

from streamer.engine.backend import BROKEN, BackendInfo, BatcherClosed, KVStats, QueueFull, stream_pieces
from streamer.engine.engine import BROKEN_TOKEN, Finished, TokenRequest, admit
from streamer.engine.requests import (
    Generated,
    GenRequest,
    GenResult,
    Request,
    Result,
    ScoreRequest,
    ScoreResult,
    label_score,
)
from streamer.engine.worker import LLMWorker
from streamer.lifecycle import AsyncLifecycle

log = logging.getLogger(__name__)

_WATCH_S = 1.0  # an idle engine thread still steps this often: engine worker processes are watched for deaths


class EngineLike(Protocol):
    """What the engine thread drives: an `Engine` in this process, or `ProcessEngines` in children."""

    on_token: Callable[[Hashable, int], None] | None  # hears each generated token (streaming)

    @property
    def idle(self) -> bool:
        """Nothing queued or running."""
        ...

    @property
    def alive(self) -> bool:
        """Whether it can serve now (readiness)."""
        ...

    @property
    def waiting(self) -> int:
        """Requests not admitted yet."""
        ...

    @property
    def last_step_size(self) -> int:
        """Sequences in the last step."""
        ...

    def kv_usage(self) -> tuple[int, int, int]: ...

    def add(self, key: Hashable, request: TokenRequest, deadline_s: float) -> Finished | None: ...

    def step(self) -> list[Finished]: ...


@dataclass(eq=False)
class _Call:
    request: Request
    tokens_request: TokenRequest
    deadline_s: float
    submitted_s: float
    tokens: int
    future: asyncio.Future[Generated]
    on_piece: Callable[[str], None] | None = None  # a streaming caller's
    sampled: list[int] = field(default_factory=list)  # its tokens so far
    shown: str = ""  # their text already handed to on_piece
    broken: bool = False  # on_piece was handed BROKEN: no more pieces


class ContinuousPool(AsyncLifecycle):
    def __init__(self, engine: EngineLike, worker: LLMWorker, max_queue: int, default_deadline_ms: float,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        """`worker` turns chats into token ids and ids back into text; `on_batch(size, step_s)` hears of
        every engine step (sequences in it, its duration); `on_close` runs once the engine thread stopped
        (engine worker processes stop there)."""
        self.engine = engine
        self._on_close = on_close
        self.worker = worker
        self.max_queue = max_queue
        self.default_deadline_s = default_deadline_ms / 1000
        self.inflight_tokens = 0
        self._on_batch = on_batch
        self._calls: dict[int, _Call] = {}
        self._keys = itertools.count()
        self._inbox: list[tuple[int, _Call]] = []
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._room = asyncio.Event()
        self._failure: BaseException | None = None
        engine.on_token = self._token_from_thread

    @property
    def depth(self) -> int:
        """Requests waiting for the engine to admit them."""
        return self.engine.waiting + len(self._inbox)

    def free_slots(self) -> int:
        return self.max_queue - len(self._calls)

    @property
    def alive(self) -> bool:
        """Whether the engine can serve: its thread has not failed, and (in worker processes) a child is up."""
        return self._failure is None and self.engine.alive

    def kv_usage(self) -> tuple[int, int, int]:
        """(blocks used, blocks in all, prompt tokens reused from the prefix cache so far), for metrics."""
        return self.engine.kv_usage()

    def kv_stats(self) -> KVStats:
        return KVStats(*self.kv_usage())

    @property
    def model_name(self) -> str:
        return self.worker.name

    @property
    def info(self) -> BackendInfo:
        return self.worker.info()

    def count_tokens(self, text: str) -> int:
        return self.worker.text_tokens(text)

    async def wait_for_room(self) -> None:
        while self.free_slots() <= 0:
            self._room.clear()
            await self._room.wait()

    async def start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._serve, name="llm-engine", daemon=True)
            self._thread.start()

    async def aclose(self) -> None:
        """Take no more requests, finish every one already taken, then stop the engine thread."""
        self._closing = True
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._on_close is not None:
            await asyncio.to_thread(self._on_close)
            self._on_close = None

    def submit(self, request: Request, deadline_ms: float | None = None,
               on_piece: Callable[[str], None] | None = None) -> asyncio.Future[Generated]:
        """Queue one request; the earliest deadline is admitted first. Raises QueueFull when full. `on_piece`
        hears the text as tokens are sampled (see `Backend.submit`)."""
        return self._submit(request, deadline_ms, on_piece).future

    async def generate(self, request: Request, deadline_ms: float | None = None) -> Generated:
        """Submit once there is room and wait for the result."""
        await self.wait_for_room()
        return await self.submit(request, deadline_ms)

    def stream(self, request: GenRequest, deadline_ms: float | None = None) -> AsyncIterator[str | Generated]:
        """The text in pieces as the engine samples tokens, then the finished result."""
        return stream_pieces(self, request, deadline_ms)

    def _submit(self, request: Request, deadline_ms: float | None, on_piece: Callable[[str], None] | None) -> _Call:
        if self._failure is not None:
            raise RuntimeError("the engine thread failed") from self._failure
        if self._closing:
            raise BatcherClosed("the pool is closing; no new requests")
        if self.free_slots() <= 0:
            raise QueueFull(f"pool full: {len(self._calls)} requests queued or running")
        now = time.monotonic()
        tokens_request = self._tokens_request(request)
        tokens = len(tokens_request.prompt) * max(1, len(tokens_request.labels))
        deadline_s = now + (deadline_ms / 1000 if deadline_ms is not None else self.default_deadline_s)
        loop = asyncio.get_running_loop()
        call = _Call(request, tokens_request, deadline_s, now, tokens, loop.create_future(), on_piece)
        key = next(self._keys)
        self._calls[key] = call
        self.inflight_tokens += tokens
        with self._wake:
            self._inbox.append((key, call))
            self._wake.notify()
        return call

    def _serve(self) -> None:
        """The engine thread: admit what arrived, step, hand results back; exits once closed and drained."""
        try:
            while True:
                with self._wake:
                    if not self._inbox and self.engine.idle and not self._closing:
                        self._wake.wait(_WATCH_S)
                    arrived, self._inbox = self._inbox, []
                if not arrived and self.engine.idle and self._closing:
                    return
                finished = [f for key, call in arrived
                            if (f := admit(self.engine.add, key, call.tokens_request, call.deadline_s))]
                started = time.monotonic()
                finished += self.engine.step()
                self._report(self.engine.last_step_size, time.monotonic() - started)
                for done in finished:
                    self._call_soon(self._resolve, done)
        except BaseException as exc:  # a bug in the engine: fail every caller instead of hanging them
            log.exception("the engine thread failed")
            self._failure = exc
            self._call_soon(self._fail_all, exc)

    def _report(self, size: int, step_s: float) -> None:
        if self._on_batch is not None and size:
            self._call_soon(self._on_batch, size, step_s)

    def _token_from_thread(self, key: Hashable, token: int) -> None:
        call = self._calls.get(key)  # type: ignore[call-overload]  # keys are the ints from _keys
        if call is not None and call.on_piece is not None:
            self._call_soon(self._piece, call, token)

    def _piece(self, call: _Call, token: int) -> None:
        """Hand a streaming caller the text its new token adds: stripped like the final text, and a split
        multi-byte character waits for its other bytes."""
        assert call.on_piece is not None
        if call.broken:
            return
        if token == BROKEN_TOKEN:  # the engine's retry no longer continues the tokens streamed
            call.broken = True
            call.on_piece(BROKEN)
            return
        call.sampled.append(token)
        text = self.worker.decode(call.sampled)
        if len(text) > len(call.shown) and text.startswith(call.shown) and not text.endswith("\ufffd"):
            call.on_piece(text[len(call.shown):])
            call.shown = text

    @staticmethod
    def _last_piece(call: _Call, text: str) -> None:
        """What of the answer's text the pieces have not shown yet (the end of a character cut by the token
        cap, which `_piece` held back); `BROKEN` where the answer does not continue what was shown."""
        assert call.on_piece is not None
        if not text.startswith(call.shown):
            call.broken = True
            call.on_piece(BROKEN)
        elif len(text) > len(call.shown):
            call.on_piece(text[len(call.shown):])
            call.shown = text

    def _call_soon(self, callback: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *args)

    def _resolve(self, done: Finished) -> None:
        call = self._calls.pop(done.key)  # type: ignore[call-overload]
        self.inflight_tokens -= call.tokens
        self._room.set()
        finished_s = time.monotonic()
        result = self._result(call, done)
        if (call.on_piece is not None and not call.broken and not call.future.done()
                and isinstance(result, GenResult) and result.error is None):
            self._last_piece(call, result.text)
        generated = Generated(
            result=result,
            queued_ms=(done.admitted_s - call.submitted_s) * 1000,
            model_ms=(finished_s - done.admitted_s) * 1000,
            batch_size=self.engine.last_step_size,
            first_token_ms=None if done.first_token_s is None else (done.first_token_s - call.submitted_s) * 1000,
        )
        if not call.future.done():
            call.future.set_result(generated)

    def _tokens_request(self, request: Request) -> TokenRequest:
        prompt = tuple(self.worker.prompt_ids([request.messages])[0])
        if isinstance(request, ScoreRequest):
            return TokenRequest(prompt, labels=tuple(tuple(ids) for ids in self.worker.label_ids(request.labels)))
        stops = frozenset() if request.ignore_eos else self.worker.eos_ids
        return TokenRequest(prompt, request.max_new_tokens, request.temperature, stops, session=request.session,
                            schema=request.schema)

    def _result(self, call: _Call, done: Finished) -> Result:
        """The worker's result types, built the way the static path builds them."""
        request, tokens_in = call.request, len(call.tokens_request.prompt)
        if isinstance(request, ScoreRequest):
            if done.error is not None:
                return ScoreResult("", {}, tokens_in, error=done.error)
            return self.worker.score_result(request, tokens_in, [label_score(lp) for lp in done.label_logprobs])
        if done.error is not None:
            return GenResult("", tokens_in, 0, error=done.error)
        return self.worker.gen_result(done.tokens, tokens_in, request)

    def _fail_all(self, exc: BaseException) -> None:
        for call in self._calls.values():
            if not call.future.done():
                call.future.set_exception(RuntimeError(f"the engine thread failed: {exc!r}"))
        self._calls.clear()
        self.inflight_tokens = 0
        self._room.set()
