"""Decode at batch 1 against the memory-bandwidth limit: every token reads every weight once.

    python -m bench.decode_bandwidth --config bench/configs/llama-3-8b.json --device cuda

Measures the device's bandwidth with a large device-to-device copy (bytes read + written per
second), then decodes --tokens tokens at batch 1 with the engine and with plain `generate` on
random weights of the given shape, and prints tokens/s, weight bytes per token, the bandwidth that
implies, and its share of the measured bandwidth. A GPU benchmark; on a CPU it runs but says little.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.engine import load
from streamer.engine.engine import Engine, EngineConfig, TokenRequest


@dataclass(frozen=True)
class DecodeFigures:
    system: str
    tokens_per_s: float
    weight_bytes: int
    achieved_gb_s: float
    device_gb_s: float
    share: float


def device_bandwidth(device: torch.device, gib: float = 4.0, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy, read plus write."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * src.nbytes * repeats / (time.perf_counter() - started)


def engine_decode(model: torch.nn.Module, prompt: list[int], tokens: int) -> float:
    engine = Engine(model, EngineConfig(num_blocks=256, max_running=1), end_ids=frozenset())
    engine.add(0, TokenRequest(tuple(prompt), 2), 0.0)  # warm-up
    while not engine.idle:
        engine.step()
    engine.add(1, TokenRequest(tuple(prompt), tokens + 1), 0.0)
    engine.step()  # the prefill and first token are not decode
    _sync(engine.runner.device)
    started = time.perf_counter()
    while not engine.idle:
        engine.step()
    _sync(engine.runner.device)
    return tokens / (time.perf_counter() - started)


def generate_decode(model: torch.nn.Module, prompt: list[int], tokens: int) -> float:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)

    def run(n: int) -> float:
        _sync(device)
        started = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - started

    run(2)
    return (tokens - 1) / (run(tokens) - run(1))  # subtract the prefill and the first token


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> list[DecodeFigures]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    model = load(args.config, args.device, args.dtype)
    device = next(model.parameters()).device
    weight_bytes = sum(p.nbytes for p in model.parameters())
    bandwidth = device_bandwidth(device)
    prompt = list(range(100, 164))
    rows = []
    for system, rate in (("engine, batch 1", engine_decode(model, prompt, args.tokens)),
                         ("generate, batch 1", generate_decode(model, prompt, args.tokens))):
        achieved = weight_bytes * rate
        rows.append(DecodeFigures(system, rate, weight_bytes, achieved / 1e9, bandwidth / 1e9, achieved / bandwidth))
    print(f"{args.config}: {weight_bytes / 1e9:.2f} GB of weights ({model.dtype}); "
          f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    for r in rows:
        print(f"{r.system:<20}{r.tokens_per_s:>9.1f} tok/s  {r.achieved_gb_s:>7.0f} GB/s  "
              f"{100 * r.share:>5.1f}% of the measured bandwidth")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
