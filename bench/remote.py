"""What streamer's openai backend costs over calling the server directly: the same chat requests sent to
llama.cpp's llama-server (ops/llama, the SmolLM2 GGUF) by a bare aiohttp client and through
`OpenAIBackend` (EDF, token budget, adaptive limit, streaming), at the same concurrency, alternating
rounds so drift shows. Prints answered tokens/s of each run, and the ratio of the best of each.

    .venv/bin/python -m bench.remote [--requests 48] [--concurrency 16] [--max-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import aiohttp

from streamer.config import EngineSettings
from streamer.engine.openai import open_backend
from streamer.engine.requests import GenRequest, GenResult
from tests.integration.services import llama_service

PROMPTS = [f"In two sentences, explain why topic number {i} matters to a small shop." for i in range(64)]


async def direct(base_url: str, requests: int, concurrency: int, max_tokens: int) -> tuple[int, float]:
    """Tokens answered and seconds taken by plain concurrent POSTs to /chat/completions."""
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> int:
            body = {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            async with gate, session.post(f"{base_url}/chat/completions", json=body) as response:
                response.raise_for_status()
                return int((await response.json())["usage"]["completion_tokens"])

        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(i) for i in range(requests)))
        return sum(tokens), time.perf_counter() - started


async def through_backend(base_url: str, requests: int, concurrency: int, max_tokens: int) -> tuple[int, float]:
    """The same requests through streamer's backend, which keeps its own order and limit."""
    engine = EngineSettings(kind="openai", openai={"base_url": base_url, "model": "smollm2",
                                                   "max_concurrency": concurrency, "min_concurrency": 1})
    backend = open_backend(engine, max_queue=requests)
    await backend.start()
    try:
        started = time.perf_counter()
        done = await asyncio.gather(*(backend.generate(GenRequest(
            ({"role": "user", "content": PROMPTS[i % len(PROMPTS)]},), max_new_tokens=max_tokens))
            for i in range(requests)))
        elapsed = time.perf_counter() - started
    finally:
        await backend.aclose()
    results = [d.result for d in done]
    assert all(isinstance(r, GenResult) and r.error is None for r in results)
    return sum(r.tokens_out for r in results if isinstance(r, GenResult)), elapsed


async def measure(base_url: str, args: argparse.Namespace) -> None:
    await direct(base_url, 8, args.concurrency, 4)  # warm the server's caches
    rates: dict[str, list[float]] = {"direct": [], "backend": []}
    for _ in range(args.rounds):  # alternating, so drift and a noisy neighbour hit both sides alike
        for name, run in (("direct", direct), ("backend", through_backend)):
            tokens, seconds = await run(base_url, args.requests, args.concurrency, args.max_tokens)
            rates[name].append(tokens / seconds)
            print(f"{name:8s} {tokens:5d} tokens in {seconds:6.2f} s = {tokens / seconds:7.1f} tokens/s")
    best = {name: max(values) for name, values in rates.items()}
    print(f"best of {args.rounds}: direct {best['direct']:.1f}, backend {best['backend']:.1f} tokens/s; "
          f"backend / direct: {best['backend'] / best['direct']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("LLAMA_PARALLEL", str(args.concurrency))
    with tempfile.TemporaryDirectory() as run_dir, llama_service(Path(run_dir)) as server:
        print(f"llama-server {server.base_url}, {os.environ['LLAMA_PARALLEL']} slots; {args.requests} requests, "
              f"concurrency {args.concurrency}, up to {args.max_tokens} tokens each")
        asyncio.run(measure(server.base_url, args))


if __name__ == "__main__":
    main()
