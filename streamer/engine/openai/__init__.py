"""engine.kind openai: the `Backend` that sends work to an OpenAI-compatible server (vLLM, SGLang, TGI,
llama.cpp, Ollama, OpenAI). One job per module: limiter (adaptive concurrency), circuit (breaker), retry
(failure classes, backoff), schedule (earliest deadline first, token budget), labels (classify), tokens
(local counts), client (HTTP), backend (the Backend itself). Imports neither torch nor transformers."""

from __future__ import annotations

from streamer.config import EngineSettings
from streamer.engine.openai.backend import OpenAIBackend, RemoteObserver, ServerRefused
from streamer.engine.openai.tokens import TokenizerMissing, load_tokenizer

__all__ = ["OpenAIBackend", "RemoteObserver", "ServerRefused", "TokenizerMissing", "open_backend"]


def open_backend(engine: EngineSettings, max_queue: int, observer: RemoteObserver | None = None) -> OpenAIBackend:
    """The backend engine.openai names, ready to `start` (which checks the key and the model)."""
    return OpenAIBackend(engine.openai, load_tokenizer(engine.openai.tokenizer), max_queue,
                         engine.default_deadline_ms, observer)
