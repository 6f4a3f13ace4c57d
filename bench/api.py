"""The Python API: 64 concurrent callers vs the same prompts one by one, and what HTTP adds, in one run.

    .venv/bin/python -m bench.api [--callers 64] [--new-tokens 32] [--requests 200]

One pool (`streamer.LLMPool`, model, batching and engine from $STREAMER_CONFIG / STREAMER_* as for
`streamer run`), on the real default model:

  throughput  the same prompts (bench/generate.py's) awaited one at a time, then all from concurrent
              callers at once, so the pool batches them. Greedy, so both modes generate the same text
              (up to batched float rounding); tokens/s counts the tokens each mode really generated.
  latency     the same small request (one new token) sequentially, alternating between the in-process
              API and the OpenAI-compatible endpoint (`streamer serve`'s routes, in this process, over
              a keep-alive localhost connection), so drift on this noisy machine hits both alike. The
              endpoint's added latency is the difference of the p50s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import torch

from bench.generate import prompts
from streamer import Completion, LLMPool
from streamer.config import load_settings
from streamer.engine.load import load_worker
from streamer.serve.openai import start_server

SMALL = [{"role": "user", "content": "Say hi."}]


@dataclass(frozen=True)
class Throughput:
    mode: str
    seconds: float
    completions: list[Completion]

    @property
    def tokens(self) -> int:
        return sum(c.tokens_out for c in self.completions)

    def row(self) -> str:
        n = len(self.completions)
        batch = max(c.batch_size for c in self.completions)
        return (f"{self.mode:<22}{self.seconds:>9.2f}{n / self.seconds:>10.2f}{self.tokens:>8}"
                f"{self.tokens / self.seconds:>10.1f}{batch:>11}")  # fmt: skip


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_by_one(pool: LLMPool, texts: Sequence[str], new_tokens: int) -> Throughput:
    started = time.perf_counter()
    done = [await pool.generate(t, max_new_tokens=new_tokens) for t in texts]
    return Throughput("one-by-one", time.perf_counter() - started, done)


async def concurrent(pool: LLMPool, texts: Sequence[str], new_tokens: int) -> Throughput:
    started = time.perf_counter()
    done = await asyncio.gather(*(pool.generate(t, max_new_tokens=new_tokens) for t in texts))
    return Throughput(f"{len(texts)} concurrent callers", time.perf_counter() - started, list(done))


async def timed_ms(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def latencies(pool: LLMPool, requests: int) -> tuple[list[float], list[float]]:
    """(in-process ms, HTTP ms) for the same small chat request, alternating between the two."""
    runner = await start_server(pool, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
    body = {"model": pool.model, "messages": SMALL, "max_tokens": 1}
    try:
        async with aiohttp.ClientSession() as http:

            async def over_http() -> None:
                async with http.post(url, json=body) as response:
                    assert response.status == 200, await response.text()
                    await response.json()

            async def in_process() -> None:
                await pool.generate(SMALL, max_new_tokens=1)

            for _ in range(3):  # warm both paths (connection, first parse)
                await in_process()
                await over_http()
            pairs = [(await timed_ms(in_process), await timed_ms(over_http)) for _ in range(requests)]
    finally:
        await runner.cleanup()
    return [a for a, _ in pairs], [h for _, h in pairs]


async def run(args: argparse.Namespace) -> None:
    settings = load_settings(None)
    worker = await asyncio.to_thread(load_worker, settings.model)
    texts = prompts(args.callers)
    async with LLMPool.resident(worker, settings.batching, settings.engine) as pool:
        await pool.generate(texts[0], max_new_tokens=args.new_tokens)  # warm-up
        alone = await one_by_one(pool, texts, args.new_tokens)
        together = await concurrent(pool, texts, args.new_tokens)
        in_process, via_http = await latencies(pool, args.requests)

    print(f"{'mode':<22}{'seconds':>9}{'calls/s':>10}{'tokens':>8}{'tokens/s':>10}{'max batch':>11}")
    print(alone.row())
    print(together.row())
    ratio = (together.tokens / together.seconds) / (alone.tokens / alone.seconds)
    calls = alone.seconds / together.seconds
    print(f"throughput, concurrent / one-by-one: {ratio:.2f}x tokens/s, {calls:.2f}x calls/s (target >= 4x)")
    print(f"\n{'path (1 new token)':<22}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}   ({args.requests} requests each)")
    for name, samples in (("in-process API", in_process), ("HTTP endpoint", via_http)):
        print(f"{name:<22}{statistics.median(samples):>9.2f}{percentile(samples, 0.99):>9.2f}"
              f"{statistics.fmean(samples):>9.2f}")  # fmt: skip
    added = statistics.median(via_http) - statistics.median(in_process)
    paired = statistics.median(h - a for h, a in zip(via_http, in_process, strict=True))
    print(f"HTTP added latency at p50: {added:.2f} ms (median of paired differences {paired:.2f} ms; target < 5 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=200, help="small requests per path for the latency part")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {args.callers} prompts x {args.new_tokens} new tokens")  # fmt: skip
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
