"""`streamer demo`: a whole pipeline on the embedded defaults, from questions in to answers out.

Produces the example questions, runs the service until every one is answered and its windows have
closed, then prints the answers and window results read back from Kafka and a throughput/latency
summary. While it runs, its HTTP port serves the metrics and the live dashboard; with `stay` it keeps
running (pipeline, Redis, dashboard) until Ctrl-C, so the dashboard can be watched.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from streamer.config import Route, Settings, WindowSettings
from streamer.engine.backend import Backend
from streamer.engine.load import load_backend
from streamer.errors import StreamerError
from streamer.kafka.client_config import base_config
from streamer.kafka.tools import produce_lines, read_topic
from streamer.observe import http
from streamer.observe.dashboard.routes import add_dashboard
from streamer.observe.metrics import Metrics
from streamer.pipeline.app import Pipeline, connect
from streamer.runtime import Endpoints, endpoints


@dataclass(frozen=True)
class DemoReport:
    answers: list[dict]
    windows: list[dict]
    elapsed_s: float


def demo_route(route: Route) -> Route:
    """The demo's route: the configured one, plus a 10 s count window per key if it has none."""
    if route.window is not None:
        return route
    window = WindowSettings(kind="tumbling", size_ms=10_000, idle_timeout_ms=2000, output=f"{route.output}-windows")
    return route.model_copy(update={"window": window})


def run_demo(settings: Settings, questions: Path, console: Console, *, stay: bool = False,
             timeout_s: float = 900.0) -> DemoReport:
    lines = [line for line in questions.read_bytes().splitlines() if line.strip()]
    route = demo_route(settings.routes[0])
    settings = settings.model_copy(update={"routes": [route]})
    with endpoints(settings) as ends:
        console.print(f"Kafka: [bold]{ends.bootstrap}[/]{' (embedded mock cluster)' * ends.embedded_kafka}  "
                      f"Redis: [bold]{ends.redis_url}[/]{' (embedded redis-server)' * ends.embedded_redis}")
        with console.status("Loading the model (the first run converts it into the local cache)..."):
            metrics = Metrics()
            backend = load_backend(settings.model, settings.batching, settings.engine, metrics.batch_done,
                                   observer=metrics)
        kafka = base_config(settings.kafka, ends.bootstrap)
        produce_lines(kafka, route.input, lines, key_field="key")
        console.print(f"Produced {len(lines)} questions to [bold]{route.input}[/]; answering with {backend.model_name}")
        elapsed_s = asyncio.run(_answer_all(settings, ends, backend, metrics, len(lines), console, stay, timeout_s))
        answers = [orjson.loads(m.value()) for m in read_topic(kafka, route.output or "", idle_timeout_s=5.0)]
        windows = [orjson.loads(m.value()) for m in read_topic(kafka, route.window.output, idle_timeout_s=2.0)]
    return DemoReport(answers, windows, elapsed_s)


async def _answer_all(settings: Settings, ends: Endpoints, backend: Backend, metrics: Metrics, expected: int,
                      console: Console, stay: bool, timeout_s: float) -> float:
    pipeline = connect(settings, ends.bootstrap, ends.redis_url, backend, create_topics=not ends.embedded_kafka,
                       metrics=metrics)
    stop = asyncio.Event()
    runner = await _serve(pipeline, settings, ends, console)
    started_s = time.monotonic()
    running = asyncio.create_task(pipeline.run(stop))
    try:
        with Progress(console=console, transient=True) as progress:
            bar = progress.add_task("answering", total=expected)
            while not _finished(pipeline, expected) and not running.done():
                if time.monotonic() - started_s > timeout_s:
                    raise StreamerError(f"only {pipeline.written} of {expected} answered in {timeout_s:.0f} s")
                progress.update(bar, completed=pipeline.written)
                await asyncio.sleep(0.1)
        elapsed_s = time.monotonic() - started_s
        if stay and not running.done():
            console.print("Done; still running so the dashboard stays live. Ctrl-C to stop.")
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
            await asyncio.wait([running, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        await running
        if runner is not None:
            await http.stop(runner)
    return elapsed_s


def _finished(pipeline: Pipeline, expected: int) -> bool:
    """Every question answered and every window it opened closed and written."""
    return pipeline.written >= expected and all(stage.open_windows == 0 for stage in pipeline.stages.values())


async def _serve(pipeline: Pipeline, settings: Settings, ends: Endpoints, console: Console):
    """Metrics and the dashboard on the HTTP port (any free port when the configured one is taken)."""
    if settings.observe.http_port is None:
        return None
    app = http.build_app(pipeline.metrics, http.readiness_of(pipeline.probes()), pipeline.liveness.problem)
    add_dashboard(app, ends.redis_url, settings.redis.prefix, token=settings.observe.auth_token,
                  max_streams=settings.observe.max_live_streams)
    try:
        runner = await http.serve(app, settings.observe.http_host, settings.observe.http_port)
    except OSError:
        runner = await http.serve(app, settings.observe.http_host, 0)
    console.print(f"Dashboard: [bold]http://localhost:{http.bound_port(runner)}/[/]  (metrics at /metrics)")
    return runner


def print_report(report: DemoReport, console: Console) -> None:
    table = Table(title="Answers")
    for column in ("id", "answer", "tokens", "latency ms"):
        table.add_column(column)
    for answer in sorted(report.answers, key=lambda a: a["id"]):
        table.add_row(answer["id"], answer["output"][:100], str(answer["tokens_out"]), f"{answer['latency_ms']:.0f}")
    console.print(table)
    windows = Table(title="Windows (10 s tumbling, per key)")
    for column in ("key", "start", "events"):
        windows.add_column(column)
    for window in sorted(report.windows, key=lambda w: (str(w["key"]), w["window"]["start"])):
        start = time.strftime("%H:%M:%S", time.localtime(window["window"]["start"] / 1000))
        windows.add_row(str(window["key"]), start, str(window["count"]))
    console.print(windows)
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


