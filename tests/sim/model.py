"""The model in memory: requests wait until the simulation completes or fails them, in any order.

Answers are a function of the prompt, so a replayed event gets the same answer and label as before
(as a greedy model would give); only failures depend on when they happen. A streaming caller gets the answer
in two pieces, the first as soon as the request is in (so a flush can write it while the request waits),
the rest when it finishes; where the text splits depends on the attempt (`attempts`, per prompt, shared
across restarts), so two runs of an event stream different deltas and any mix of them fails to join.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from streamer.engine.backend import BackendInfo, stream_pieces
from streamer.engine.requests import Generated, GenRequest, GenResult, Request, ScoreRequest, ScoreResult

MODEL_NAME = "sim-model"


def label_of(text: str, labels: tuple[str, ...]) -> str:
    """The label the stand-in gives a text: the same every time."""
    digest = hashlib.blake2b(text.encode(), digest_size=2).digest()
    return labels[int.from_bytes(digest, "big") % len(labels)]


@dataclass(eq=False)
class _Pending:
    request: Request
    future: asyncio.Future[Generated]
    on_piece: Callable[[str], None] | None = None
    shown: str = ""  # handed to on_piece already
    attempt: int = 0  # of its prompt


class SimPool:
    """What the pipeline needs of a model pool: bounded submission, futures, room to wait for."""

    def __init__(self, max_queue: int, attempts: Counter[str] | None = None) -> None:
        self.max_queue = max_queue
        self.attempts: Counter[str] = Counter() if attempts is None else attempts
        self.pending: list[_Pending] = []
        self.inflight_tokens = 0
        self.calls = 0
        self.away = False  # a remote model server gone: no admission (its circuit is open), not ready
        self._room: asyncio.Event | None = None

    model_name = MODEL_NAME
    info = BackendInfo(MODEL_NAME, "the simulation")

    def count_tokens(self, text: str) -> int:
        return len(text) // 4 + 1

    def kv_stats(self) -> None:
        return None

    @property
    def depth(self) -> int:
        return len(self.pending)

    async def start(self) -> None:
        self._room = asyncio.Event()

    async def aclose(self) -> None:
        return None

    @property
    def alive(self) -> bool:
        return not self.away

    def free_slots(self) -> int:
        return 0 if self.away else self.max_queue - len(self.pending)

    async def wait_for_room(self) -> None:
        assert self._room is not None
        while self.free_slots() <= 0:
            self._room.clear()
            await self._room.wait()

    def submit(self, request: Request, deadline_ms: float | None = None,
               on_piece: Callable[[str], None] | None = None) -> asyncio.Future[Generated]:
        assert self.free_slots() > 0, "the pipeline submitted past its room"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Generated] = loop.create_future()
        prompt = request.messages[-1]["content"]
        self.attempts[prompt] += 1
        call = _Pending(request, future, on_piece, attempt=self.attempts[prompt])
        self.pending.append(call)
        self.calls += 1
        if on_piece is not None and isinstance(request, GenRequest):
            loop.call_soon(self._first_piece, call)
        return future

    @staticmethod
    def _first_piece(call: _Pending) -> None:
        """The answer's head, split where this attempt splits it (only ever text the answer starts with)."""
        if call.future.done() or call.on_piece is None:
            return
        text = _result(call.request, True)
        assert isinstance(text, GenResult)
        call.shown = text.text[: 1 + call.attempt % (len(text.text) - 1)]
        call.on_piece(call.shown)

    async def generate(self, request: Request, deadline_ms: float | None = None) -> Generated:
        await self.wait_for_room()
        return await self.submit(request, deadline_ms)

    def stream(self, request: GenRequest, deadline_ms: float | None = None) -> AsyncIterator[str | Generated]:
        return stream_pieces(self, request, deadline_ms)

    def finish(self, index: int, *, ok: bool) -> None:
        """Complete (or fail) the request at `index` of those pending."""
        call = self.pending.pop(index % len(self.pending))
        if not call.future.done():
            result = _result(call.request, ok)
            if call.on_piece is not None and isinstance(result, GenResult) and result.error is None:
                assert result.text.startswith(call.shown)
                if len(result.text) > len(call.shown):
                    call.on_piece(result.text[len(call.shown):])
            call.future.set_result(Generated(result, 0.0, 0.0, 1))
        assert self._room is not None
        self._room.set()


def _result(request: Request, ok: bool) -> GenResult | ScoreResult:
    prompt = request.messages[-1]["content"]
    if isinstance(request, ScoreRequest):
        if not ok:
            return ScoreResult("", {}, 1, error="RuntimeError: the model failed")
        return ScoreResult(label_of(prompt, request.labels), {}, 1)
    assert isinstance(request, GenRequest)
    if not ok:
        return GenResult("", 1, 0, error="RuntimeError: the model failed")
    digest = hashlib.blake2b(prompt.encode(), digest_size=4).hexdigest()
    return GenResult(f"answer {digest}", len(prompt) // 4 + 1, 2)
