"""The model in memory: requests wait until the simulation completes or fails them, in any order.

Answers are a function of the prompt, so a replayed event gets the same answer and label as before
(as a greedy model would give); only failures depend on when they happen.
"""

from __future__ import annotations

import asyncio
import hashlib
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


class SimPool:
    """What the pipeline needs of a model pool: bounded submission, futures, room to wait for."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
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
        future: asyncio.Future[Generated] = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(request, future, on_piece))
        self.calls += 1
        return future

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
                words = result.text.split(" ")  # in two pieces, as a streaming model would
                call.on_piece(words[0])
                call.on_piece(result.text[len(words[0]):])
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
