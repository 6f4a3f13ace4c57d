"""streamer: real-time LLM inference over Kafka, and the same batched model as a Python API.

`from streamer import LLMPool` imports the model stack (torch, transformers) only on first use, so
`import streamer` stays light for the CLI and the tools.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamer.api import Classification, Completion, LLMPool

__all__ = ["Classification", "Completion", "LLMPool"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from streamer import api

        return getattr(api, name)
    raise AttributeError(f"module 'streamer' has no attribute {name!r}")
