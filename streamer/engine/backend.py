"""The seam between the pipeline and whatever runs the model: what event handling, the window stages and
the consume loop ask of it. The continuous engine and the static micro-batches implement it; so does the
simulation's stand-in. Torch-free, like the request vocabulary it speaks, so the stages that use it load
no model library."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from streamer.engine.requests import Generated, Request


@dataclass(frozen=True)
class KVStats:
    """An engine's paged KV cache: blocks in use and in all, prompt tokens reused from the prefix cache so far."""

    used_blocks: int
    total_blocks: int
    reused_tokens: int


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

    def count_tokens(self, text: str) -> int: ...

    def free_slots(self) -> int:
        """Requests `submit` takes now without raising QueueFull."""
        ...

    async def wait_for_room(self) -> None: ...

    def submit(self, request: Request, deadline_ms: float | None = None) -> asyncio.Future[Generated]: ...

    async def generate(self, request: Request, deadline_ms: float | None = None) -> Generated: ...

    def kv_stats(self) -> KVStats | None:
        """The KV cache's use, or None where the backend keeps none of its own."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...
