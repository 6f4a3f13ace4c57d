"""Loads what serves the model for a process: the resident model behind the continuous engine or static
batches, or (engine.kind openai) a remote OpenAI-compatible server. Kept apart from the embedded Kafka and
Redis starters, so the Python API loads a model without them."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from streamer.config import BatchingSettings, EngineSettings, ModelSettings
from streamer.engine.backend import Backend
from streamer.engine.build import build_pool, in_processes, processes, worker_count
from streamer.engine.worker import LLMWorker
from streamer.models.loader import load_model, resolve_device

if TYPE_CHECKING:
    from streamer.engine.openai import RemoteObserver

log = logging.getLogger(__name__)


def load_backend(model: ModelSettings, batching: BatchingSettings, engine: EngineSettings,
                 on_batch: Callable[[int, float], None] | None = None,
                 observer: RemoteObserver | None = None) -> Backend:
    """The backend the settings name, ready to `start`; `on_batch(size, seconds)` hears of every model step,
    `observer` (the Metrics) of a remote server's requests, retries, circuit and concurrency limit."""
    if engine.kind == "openai":
        from streamer.engine.openai import open_backend  # the resident path never loads it

        return open_backend(engine, batching.max_queue, observer)
    return build_pool(load_worker(model, engine), batching, engine, on_batch)


def _may_run_processes(engine: EngineSettings, settings: ModelSettings) -> bool:
    """Before loading anything: could the engine run in processes (several workers on this device, or one of
    its own)?"""
    device = resolve_device(settings.device, Path(settings.path or "model"))
    return processes(engine, worker_count(engine, device, split=False))


def load_worker(settings: ModelSettings, engine: EngineSettings | None = None) -> LLMWorker:
    """Load the model once, keep it resident, and warm it up so the first batch is not slow.

    When `engine` runs in processes of its own (one per GPU), each of them loads the weights; this
    process keeps only the tokenizer and the model's skeleton, not another copy of the weights.
    """
    load = functools.partial(load_model, settings.path, device=settings.device, dtype=settings.dtype,
                             cache_dir=settings.cache_dir, device_map=settings.device_map)
    if engine is not None and settings.device_map is None and _may_run_processes(engine, settings):
        skeleton = load(weights=False)
        if in_processes(engine, skeleton.model, skeleton.device):
            log.info("model %s: weights in the engine processes", skeleton.name)
            return LLMWorker(skeleton, threads=settings.threads)
    loaded = load()
    worker = LLMWorker(loaded, threads=settings.threads)
    worker.warm_up()
    log.info("model %s on %s (%s)", worker.name, loaded.device, loaded.dtype)
    return worker
