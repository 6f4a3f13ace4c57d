"""The seam between the pipeline and whatever runs the model: what event handling, the window stages and
the consume loop ask of it. The continuous engine and the static micro-batches implement it; so does the
simulation's stand-in. Torch-free, like the request vocabulary it speaks, so the stages that use it load
no model library."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from streamer.engine.requests import Generated, GenRequest, Request
from streamer.errors import StreamerError


class QueueFull(StreamerError):
    """No room: `submit` past `free_slots()`. Await `wait_for_room()`, then submit again."""


class BatcherClosed(StreamerError):
    """The backend is draining or closed and takes no new requests."""


@dataclass(frozen=True)
class KVStats:
    """An engine's paged KV cache: blocks in use and in all, prompt tokens reused from the prefix cache so far."""

    used_blocks: int
    total_blocks: int
    reused_tokens: int


@dataclass(frozen=True)
class BackendInfo:
    """What serves the model, for the start-up summary and the model metrics."""

    model: str
    where: str  # "cpu (torch.float32)", or a remote server's base URL
    manifest: Mapping[str, Any] | None = None  # a compressed artifact's manifest (what it is, what it measured)
    resident_bytes: int = 0  # weights held in this process's memory; 0 for a remote server


def recipes(manifest: Mapping[str, Any] | None) -> str:
    """A compressed artifact's recipes as one name ("int8+prune"), or "none"."""
    return "+".join(step["recipe"] for step in (manifest or {}).get("steps", [])) or "none"


class Backend(Protocol):
    """Bounded submission with futures, the room and depth that backpressure reads, and the model's facts."""

    inflight_tokens: int  # tokens of the requests being worked on (prompt and answer room), for metrics

    @property
    def model_name(self) -> str: ...

    @property
    def alive(self) -> bool:
        """Whether it can serve now (readiness)."""
        ...

    @property
    def depth(self) -> int:
        """Requests queued or running."""
        ...

    @property
    def info(self) -> BackendInfo: ...

    def count_tokens(self, text: str) -> int: ...

    def free_slots(self) -> int:
        """Requests `submit` takes now without raising QueueFull."""
        ...

    async def wait_for_room(self) -> None: ...

    def submit(self, request: Request, deadline_ms: float | None = None,
               on_piece: Callable[[str], None] | None = None) -> asyncio.Future[Generated]:
        """Queue one request; `on_piece` (on the event loop, never after the future is done) hears the answer's
        text in pieces as it is generated, which join to the result's text (a backend that cannot stream
        hands it the whole text once), unless the last is `BROKEN`: text is missing. The future is the answer
        either way: pieces are a side channel."""
        ...

    async def generate(self, request: Request, deadline_ms: float | None = None) -> Generated: ...

    def stream(self, request: GenRequest, deadline_ms: float | None = None) -> AsyncIterator[str | Generated]:
        """The answer's text in pieces as they are generated, then the finished result (a backend that cannot
        stream yields the whole text once); `stream_pieces` implements it over `submit`."""
        ...

    def kv_stats(self) -> KVStats | None:
        """The KV cache's use, or None where the backend keeps none of its own."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class Broken(str):
    """The piece a backend hands `on_piece` when its stream broke: text is missing from the pieces handed
    before, or the answer no longer continues them (a retry that sampled other text). It is empty, so it joins
    harmlessly; a caller that tells it apart marks the gap (the partial writer's final marker skips a `seq`).
    No more pieces of the request follow it."""


BROKEN = Broken("")


async def stream_pieces(backend: Backend, request: GenRequest,
                        deadline_ms: float | None = None) -> AsyncIterator[str | Generated]:
    """`Backend.stream` over `submit`'s `on_piece`: once there is room, the pieces, then the result. Pieces are
    handed out before the future resolves, so the queue holds them all before its end marker."""
    await backend.wait_for_room()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    future = backend.submit(request, deadline_ms, on_piece=pieces.put_nowait)
    future.add_done_callback(lambda _: pieces.put_nowait(None))
    while (piece := await pieces.get()) is not None:
        yield piece
    yield await future
