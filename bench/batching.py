"""One-by-one vs static micro-batches vs the continuous engine: the same questions through the real broker,
Redis and model, in one run.

    .venv/bin/python -m bench.batching [--events 256] [--max-new-tokens 16] [--max-batch 32]

Prints events/s, output tokens/s and p50/p99 end-to-end latency for each mode, and the throughput ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
import uuid
from dataclasses import dataclass

import orjson
import torch

from bench.services import kafka_broker, redis_server
from streamer.config import Settings
from streamer.engine.build import resident
from streamer.engine.load import load_worker
from streamer.engine.worker import LLMWorker
from streamer.kafka.tools import produce_lines, read_topic
from streamer.pipeline.app import Pipeline, connect

SUBJECTS = ["France", "Japan", "Brazil", "Kenya", "Canada", "India", "Norway", "Egypt"]
TEMPLATES = [
    "What is the capital of {}?",
    "Name one famous food from {}.",
    "Which continent is {} in?",
    "What language is spoken in {}?",
]


@dataclass(frozen=True)
class Result:
    mode: str
    events: int
    elapsed_s: float
    tokens_out: int
    latencies_ms: list[float]

    def row(self) -> str:
        lat = sorted(self.latencies_ms)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        return (
            f"{self.mode:<14} {self.events / self.elapsed_s:>9.2f} {self.tokens_out / self.elapsed_s:>10.1f} "
            f"{statistics.median(lat):>9.0f} {p99:>9.0f}"
        )


def questions(n: int, max_new_tokens: int) -> list[bytes]:
    out = []
    for i in range(n):
        text = TEMPLATES[i % len(TEMPLATES)].format(SUBJECTS[(i // len(TEMPLATES)) % len(SUBJECTS)])
        doc = {
            "id": f"b-{i:04d}",
            "key": f"k{i % 8}",
            "text": text,
            "params": {"max_new_tokens": max_new_tokens},
        }
        out.append(orjson.dumps(doc))
    return out


async def _until_written(pipeline: Pipeline, expected: int) -> float:
    stop = asyncio.Event()
    running = asyncio.create_task(pipeline.run(stop))
    started_s = time.monotonic()
    while pipeline.written < expected and not running.done():
        await asyncio.sleep(0.05)
    elapsed_s = time.monotonic() - started_s
    stop.set()
    await running
    return elapsed_s


def run_mode(
    mode: str, engine: str, max_batch: int, bootstrap: str, redis_url: str, worker: LLMWorker, events: list[bytes]
) -> Result:
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        kafka={"bootstrap_servers": bootstrap, "group_id": f"bench-{tag}", "dead_letter_topic": f"dlq-{tag}"},
        redis={"prefix": f"bench-{tag}"},
        batching={"max_batch": max_batch, "max_queue": 64, "max_wait_ms": 20},
        engine={"kind": engine, "max_running": max_batch},
        routes=[{"name": "q", "input": f"questions-{tag}", "output": f"answers-{tag}"}],
    )
    produce_lines({"bootstrap.servers": bootstrap}, f"questions-{tag}", events)
    pipeline = connect(settings, bootstrap, redis_url, resident(worker, settings))
    elapsed_s = asyncio.run(_until_written(pipeline, len(events)))
    answers = [
        orjson.loads(m.value())
        for m in read_topic(
            {"bootstrap.servers": bootstrap}, f"answers-{tag}", limit=len(events), idle_timeout_s=10
        )
    ]
    return Result(
        mode,
        len(answers),
        elapsed_s,
        sum(a["tokens_out"] for a in answers),
        [a["latency_ms"] for a in answers],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    settings = Settings()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{args.events} events, max_new_tokens {args.max_new_tokens}"
    )
    events = questions(args.events, args.max_new_tokens)
    with kafka_broker() as bootstrap, redis_server() as redis_url:
        worker = load_worker(settings.model)
        results = [
            run_mode("one-by-one", "static", 1, bootstrap, redis_url, worker, events),
            run_mode("micro-batched", "static", args.max_batch, bootstrap, redis_url, worker, events),
            run_mode("continuous", "continuous", args.max_batch, bootstrap, redis_url, worker, events),
        ]
    print(f"{'mode':<14} {'events/s':>9} {'tokens/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
    for result in results:
        print(result.row())
    one, batched, continuous = (r.events / r.elapsed_s for r in results)
    print(f"throughput ratios: micro-batched / one-by-one {batched / one:.2f}x, "
          f"continuous / one-by-one {continuous / one:.2f}x, continuous / micro-batched {continuous / batched:.2f}x")


if __name__ == "__main__":
    main()
