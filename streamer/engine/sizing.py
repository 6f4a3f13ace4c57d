"""How big the continuous engine is on its device: the KV cache's blocks and the step limits.

Apart from `build.py` (which pool) so that the engine worker processes, which build their own engines
from the same settings, and the builder, which starts those processes, do not import each other."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PreTrainedModel

from streamer.config import EngineSettings
from streamer.engine.engine import EngineConfig
from streamer.engine.paged import Shape

_CPU_KV_CAP = 2**30


def engine_config(engine: EngineSettings, model: PreTrainedModel, dtype: torch.dtype,
                  device: torch.device) -> EngineConfig:
    return EngineConfig(
        block_size=engine.block_size,
        num_blocks=kv_cache_blocks(engine, Shape.of(model), dtype, device),
        max_running=engine.max_running,
        max_step_tokens=engine.max_step_tokens,
        target_step_s=None if engine.target_step_ms is None else engine.target_step_ms / 1000,
        pinned_sessions=engine.pinned_sessions,
    )


def kv_cache_blocks(engine: EngineSettings, shape: Shape, dtype: torch.dtype, device: torch.device) -> int:
    """Blocks that fit the configured size, else most of free GPU memory, else a quarter of free RAM up to 1 GiB."""
    if engine.kv_cache_gib is not None:
        budget = engine.kv_cache_gib * 2**30
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.9 * free
    else:
        budget = min(_available_ram() / 4, _CPU_KV_CAP)
    return max(1, int(budget // (shape.bytes_per_token(dtype) * engine.block_size)))


def _available_ram() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
