"""Builds the pool the settings ask for: the continuous-batching engine where it can drive the model,
static micro-batches of `generate` otherwise (see README, "Which engine runs")."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from streamer.batching.batcher import BatchRules
from streamer.config import BatchingSettings, EngineSettings, Settings
from streamer.engine.backend import Backend
from streamer.engine.continuous import ContinuousPool
from streamer.engine.engine import Engine
from streamer.engine.paged import supports
from streamer.engine.pool import StaticPool
from streamer.engine.processes import ProcessEngines, child_specs
from streamer.engine.sizing import engine_config
from streamer.engine.worker import LLMWorker
from streamer.errors import StreamerError

log = logging.getLogger(__name__)


class EngineUnsupported(StreamerError):
    """`engine.kind: continuous` for a model the paged runner cannot drive."""


def build_pool(worker: LLMWorker, batching: BatchingSettings, engine: EngineSettings,
               on_batch: Callable[[int, float], None] | None = None) -> Backend:
    drivable = supports(worker.model)
    if engine.kind == "continuous" and not drivable:
        raise EngineUnsupported(
            f"engine.kind continuous drives Llama-family models; {worker.model.config.model_type!r} needs static")
    if engine.kind == "static" or not drivable:
        log.info("engine: static micro-batches of generate")
        return StaticPool(worker, BatchRules(**batching.model_dump()), on_batch=on_batch)
    workers = worker_count(engine, worker.device, split=_split(worker.model))
    if processes(engine, workers):
        engines = ProcessEngines(child_specs(worker, engine, workers))
        log.info("engine: continuous batching in %d worker processes", workers)
        return ContinuousPool(engines, worker, batching.max_queue, engine.default_deadline_ms, on_batch,
                              on_close=engines.close)
    config = engine_config(engine, worker.model, worker.loaded.dtype, worker.device)
    log.info("engine: continuous batching, %d KV blocks of %d tokens", config.num_blocks, config.block_size)
    return ContinuousPool(Engine(worker.model, config, worker.eos_ids, worker.grammars), worker, batching.max_queue,
                          engine.default_deadline_ms, on_batch)


def resident(worker: LLMWorker, settings: Settings) -> Backend:
    """The backend `settings` ask for over an already loaded worker (tests and benchmarks share one)."""
    return build_pool(worker, settings.batching, settings.engine)


def worker_count(engine: EngineSettings, device: torch.device, split: bool) -> int:
    """Engine processes to run: auto is one per CUDA device, or 1 (in this process) on CPU or for a model
    `split` across devices."""
    if split and (engine.own_process or engine.workers not in ("auto", 1)):
        raise EngineUnsupported("engine.workers > 1 and engine.own_process need a model on one device; this one "
                                "has a device_map")
    if engine.workers == "auto":
        return torch.cuda.device_count() if device.type == "cuda" and not split else 1
    if device.type == "cuda" and engine.workers > torch.cuda.device_count():
        raise EngineUnsupported(f"engine.workers is {engine.workers}; {torch.cuda.device_count()} CUDA devices exist")
    return engine.workers


def in_processes(engine: EngineSettings, model: PreTrainedModel, device: torch.device) -> bool:
    """Whether the engine runs in processes of its own, so this process needs only the model's skeleton."""
    if engine.kind == "static" or not supports(model):
        return False
    return processes(engine, worker_count(engine, device, _split(model)))


def processes(engine: EngineSettings, workers: int) -> bool:
    """Whether `workers` engines run in child processes: several always, one where `own_process` asks."""
    return workers > 1 or engine.own_process


def _split(model: PreTrainedModel) -> bool:
    return len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
