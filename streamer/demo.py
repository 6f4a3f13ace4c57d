"""`streamer demo`: a whole pipeline on the embedded defaults, from questions in to answers out.

Produces the example questions, runs the service until every one is fully written, then prints the
answers read back from the output topic and a throughput/latency summary.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from streamer.app import Pipeline
from streamer.config import Settings
from streamer.errors import StreamerError
from streamer.kafka.client_config import base_config
from streamer.kafka.tools import produce_lines, read_topic
from streamer.runtime import Endpoints, endpoints, load_worker


@dataclass(frozen=True)
class DemoReport:
    answers: list[dict]
    elapsed_s: float


def run_demo(settings: Settings, questions: Path, console: Console, timeout_s: float = 900.0) -> DemoReport:
    lines = [line for line in questions.read_bytes().splitlines() if line.strip()]
    route = settings.routes[0]
    with endpoints(settings) as ends:
        console.print(
            f"Kafka: [bold]{ends.bootstrap}[/]{' (embedded mock cluster)' * ends.embedded_kafka}  "
            f"Redis: [bold]{ends.redis_url}[/]{' (embedded redis-server)' * ends.embedded_redis}"
        )
        with console.status("Loading the model (the first run converts it into the local cache)..."):
            worker = load_worker(settings.model)
        produce_lines(base_config(settings.kafka, ends.bootstrap), route.input, lines, key_field="key")
        console.print(
            f"Produced {len(lines)} questions to [bold]{route.input}[/]; answering with {worker.name}"
        )
        elapsed_s = asyncio.run(_answer_all(settings, ends, worker, len(lines), console, timeout_s))
        answers = [
            orjson.loads(m.value())
            for m in read_topic(base_config(settings.kafka, ends.bootstrap), route.output, idle_timeout_s=5.0)
        ]
    return DemoReport(answers, elapsed_s)


async def _answer_all(
    settings: Settings, ends: Endpoints, worker, expected: int, console: Console, timeout_s: float
) -> float:
    pipeline = Pipeline(
        settings, ends.bootstrap, ends.redis_url, worker, create_topics=not ends.embedded_kafka
    )
    stop = asyncio.Event()
    started_s = time.monotonic()
    running = asyncio.create_task(pipeline.run(stop))
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("answering", total=expected)
        while pipeline.written < expected and not running.done():
            if time.monotonic() - started_s > timeout_s:
                raise StreamerError(f"only {pipeline.written} of {expected} answered in {timeout_s:.0f} s")
            progress.update(bar, completed=pipeline.written)
            await asyncio.sleep(0.1)
    elapsed_s = time.monotonic() - started_s
    stop.set()
    await running
    return elapsed_s


def print_report(report: DemoReport, console: Console) -> None:
    table = Table(title="Answers", show_lines=False)
    for column in ("id", "answer", "tokens", "latency ms"):
        table.add_column(column)
    for answer in sorted(report.answers, key=lambda a: a["id"]):
        table.add_row(
            answer["id"], answer["output"][:100], str(answer["tokens_out"]), f"{answer['latency_ms']:.0f}"
        )
    console.print(table)
    if not report.answers:
        return
    latencies = sorted(a["latency_ms"] for a in report.answers)
    tokens = sum(a["tokens_out"] for a in report.answers)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    console.print(
        f"{len(report.answers)} answers in {report.elapsed_s:.1f} s: "
        f"{len(report.answers) / report.elapsed_s:.2f} events/s, {tokens / report.elapsed_s:.1f} output tokens/s, "
        f"latency p50 {statistics.median(latencies):.0f} ms, p99 {p99:.0f} ms"
    )
