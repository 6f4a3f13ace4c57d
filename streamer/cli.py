"""The `streamer` command. Every error a user can cause prints one clear line and exits non-zero."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from streamer.config import LimitsSettings, Route, Settings, load_settings
from streamer.contracts import CONTRACTS
from streamer.errors import ConfigError, StreamerError

if TYPE_CHECKING:
    from streamer.api import LLMPool as APIPool
    from streamer.engine.backend import BackendInfo
    from streamer.pipeline.app import Pipeline
    from streamer.runtime import Endpoints

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Real-time LLM inference over Kafka.")
console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings (default: $STREAMER_CONFIG or ./streamer.yaml)"),
]
BootstrapOption = Annotated[str | None, typer.Option(
    "--bootstrap", "-b", envvar="KAFKA_BOOTSTRAP_SERVERS",
    help="default: kafka.bootstrap_servers of the config, else localhost:9092")]
SCHEMAS_DIR = Path("schemas")


def _settings(path: Path | None) -> Settings:
    if path is None:
        env = os.environ.get("STREAMER_CONFIG")
        path = Path(env) if env else (Path("streamer.yaml") if Path("streamer.yaml").exists() else None)
    return load_settings(path)


def _fail(error: Exception, code: int = 1) -> typer.Exit:
    from streamer.observe.logs import redact

    console.print(f"[red]error:[/] {escape(redact(str(error)))}", highlight=False)
    return typer.Exit(code)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def run(config: ConfigOption = None, log_level: str = "info") -> None:
    """Run the service until SIGTERM/SIGINT, then drain in-flight work, commit and exit."""
    from streamer.engine.load import load_backend
    from streamer.heap import settle_heap
    from streamer.observe.logs import new_run_id, setup_logging
    from streamer.observe.metrics import Metrics
    from streamer.pipeline.app import connect
    from streamer.runtime import endpoints

    try:
        settings = _settings(config)
        setup_logging(log_level, json=settings.observe.json_logs, run_id=new_run_id())
        with endpoints(settings) as ends:
            _check_access(settings, ends)
            metrics = Metrics()
            with console.status("Loading the model..."):
                backend = load_backend(settings.model, settings.batching, settings.engine, metrics.batch_done,
                                       observer=metrics)
            console.print(startup_summary(settings, ends, backend.info))
            pipeline = connect(settings, ends.bootstrap, ends.redis_url, backend,
                               create_topics=not ends.embedded_kafka, metrics=metrics)
            settle_heap()
            asyncio.run(_until_signal(pipeline, settings, ends.redis_url))
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    except (StreamerError, OSError) as exc:
        raise _fail(exc) from None


def _check_access(settings: Settings, ends: Endpoints) -> None:
    """Wrong credentials or TLS settings fail the start here, naming what failed, before the model loads."""
    from streamer.kafka.admin import check_access
    from streamer.state.probe import check_redis

    check_redis(ends.redis_url)
    if not ends.embedded_kafka:
        check_access(settings.kafka, ends.bootstrap)


async def _until_signal(pipeline: Pipeline, settings: Settings, redis_url: str) -> None:
    """Run the pipeline, with its HTTP port (metrics, probes, dashboard) open while it runs."""
    from streamer.observe import http
    from streamer.observe.dashboard.routes import add_dashboard

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    if settings.observe.http_port is not None:
        app = http.build_app(pipeline.metrics, http.readiness_of(pipeline.probes()), pipeline.liveness.problem)
        add_dashboard(app, redis_url, settings.redis.prefix, token=settings.observe.auth_token,
                      max_streams=settings.observe.max_live_streams)
        runner = await http.serve(app, settings.observe.http_host, settings.observe.http_port)
    try:
        await pipeline.run(stop)
    finally:
        if runner is not None:
            await http.stop(runner)


def startup_summary(settings: Settings, ends: Endpoints, model: BackendInfo) -> Table:
    """One screen saying what this process is about to do, so a wrong setting shows before traffic does."""
    from streamer.engine.backend import recipes
    from streamer.kafka.client_config import describe_security

    table = Table(title="streamer run", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    kafka = ends.bootstrap + (" (embedded mock cluster, not durable)" if ends.embedded_kafka else "")
    redis = redact_url(ends.redis_url) + (" (embedded redis-server)" if ends.embedded_redis else "")
    batching = settings.batching
    rows = {
        "kafka": f"{kafka}, group {settings.kafka.group_id}, {describe_security(settings.kafka)}",
        "redis": f"{redis}, prefix {settings.redis.prefix}",
        "model": f"{model.model} on {model.where}, compression: {recipes(model.manifest)}",
        "batching": f"max_batch {batching.max_batch}, max_wait_ms {batching.max_wait_ms:g}, "
        f"max_queue {batching.max_queue}",
        "guarantee": "exactly once (Kafka transactions, read_committed input, Redis fenced by offset)"
        if settings.processing.guarantee == "exactly_once"
        else "at least once (answers keyed by event id; Redis state applied once per event)",
        "http": f"{settings.observe.http_host}:{settings.observe.http_port}" if settings.observe.http_port else "off",
    }
    for name, value in rows.items():
        table.add_row(name, escape(value))
    for route in settings.routes:
        table.add_row(f"route {route.name}", escape(_describe_route(route)))
    return table


def redact_url(url: str) -> str:
    """A URL without its password (in the userinfo or a query parameter), for showing."""
    from streamer.observe.logs import redact

    return redact(url)


@app.command()
def demo(
    config: ConfigOption = None,
    questions: Annotated[Path, typer.Option(help="JSONL questions to produce")] = Path("examples/questions.jsonl"),
    stay: Annotated[bool, typer.Option(help="keep running afterwards, so the dashboard stays live")] = False,
) -> None:
    """Run the whole pipeline on the embedded defaults and print the answers and window results."""
    from streamer.demo import print_report, run_demo

    _logging("warning")
    try:
        settings = _settings(config)
        report = run_demo(settings, questions, Console(), stay=stay)
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    except (StreamerError, OSError) as exc:
        raise _fail(exc) from None
    print_report(report, Console())


@app.command()
def dashboard(
    config: ConfigOption = None,
    redis_url: Annotated[str | None, typer.Option(help="default: redis.url of the settings")] = None,
    host: str = "127.0.0.1",
    port: int = 9500,
    token: Annotated[str | None, typer.Option(
        envvar="STREAMER_DASHBOARD_TOKEN", show_default=False,
        help="bearer token the page and /api/* ask for (open /?token=... once); default: observe.auth_token")] = None,
) -> None:
    """Serve the live dashboard: it reads only Redis, so it works for any streamer deployment."""
    from pydantic import SecretStr

    from streamer.observe.dashboard.server import run_dashboard
    from streamer.state.client_url import client_url

    try:
        settings = _settings(config)
        url = redis_url or (client_url(settings.redis, settings.redis.url.get_secret_value())
                            if settings.redis.url else None)
        if url is None:
            raise ConfigError("no Redis to read: pass --redis-url or set redis.url (STREAMER_REDIS__URL)")
        secret = SecretStr(token) if token else settings.observe.auth_token
        asyncio.run(run_dashboard(url, settings.redis.prefix, host, port, token=secret,
                                  max_streams=settings.observe.max_live_streams))
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    except (StreamerError, OSError) as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        pass


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the OpenAI-compatible API")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        envvar="STREAMER_API_KEY", show_default=False,
        help="bearer token every /v1 request must send (set it before listening beyond 127.0.0.1)")] = None,
    log_level: str = "info",
) -> None:
    """Serve the model as an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions); no Kafka."""
    from streamer.api import LLMPool as APIPool
    from streamer.heap import settle_heap

    _logging(log_level)
    try:
        settings = _settings(config)
        with console.status("Loading the model..."):
            pool = APIPool.from_settings(settings.model, settings.batching, settings.engine)
        settle_heap()
        asyncio.run(_serve_until_signal(pool, host, port, settings.limits, api_key or None))
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    except (StreamerError, OSError) as exc:
        raise _fail(exc) from None


async def _serve_until_signal(pool: APIPool, host: str, port: int, limits: LimitsSettings,
                              api_key: str | None) -> None:
    """Serve until SIGTERM/SIGINT; requests already queued are answered before exit."""
    from streamer.serve.openai import run_server

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_server(pool, host, port, limits, stop=stop, api_key=api_key)


@app.command()
def produce(
    topic: str,
    file: Annotated[Path | None, typer.Argument(help="JSONL file; stdin when omitted")] = None,
    bootstrap: BootstrapOption = None,
    config: ConfigOption = None,
    key_field: Annotated[str, typer.Option(help="JSON field used as the message key")] = "key",
    rate: Annotated[float | None, typer.Option(help="records per second (default: as fast as possible)")] = None,
) -> None:
    """Produce JSONL lines (a file or stdin) to a topic, one record per line (SASL/TLS as in the config)."""
    from rich.progress import Progress

    from streamer.kafka.tools import produce_lines

    started_s = time.monotonic()
    try:
        client = _tool_client(config, bootstrap)
        lines = file.read_bytes().splitlines() if file else sys.stdin.buffer
        total = sum(1 for line in lines if line.strip()) if file else None
        with Progress(console=console, transient=True) as progress:
            bar = progress.add_task(f"producing to {topic}", total=total)
            count = produce_lines(client, topic, lines, key_field, rate=rate,
                                  on_record=lambda: progress.advance(bar))
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    except (StreamerError, OSError) as exc:
        raise _fail(exc) from None
    elapsed_s = max(time.monotonic() - started_s, 1e-9)
    console.print(f"produced {count} records to {topic} in {elapsed_s:.1f} s ({count / elapsed_s:.0f}/s)",
                  markup=False)


@app.command()
def tail(
    topic: str,
    bootstrap: BootstrapOption = None,
    config: ConfigOption = None,
    limit: Annotated[int | None, typer.Option("--max", "-n", help="stop after this many records")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep waiting for new records")] = False,
    pretty: Annotated[bool | None, typer.Option("--pretty/--json", help="default: pretty on a terminal")] = None,
) -> None:
    """Print a topic's records from the beginning: pretty on a terminal, JSON lines otherwise (SASL/TLS as in
    the config)."""
    from streamer.kafka.tools import read_topic

    try:
        client = _tool_client(config, bootstrap)
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    out = Console()
    pretty = out.is_terminal if pretty is None else pretty
    for message in read_topic(client, topic, limit=limit, follow=follow):
        value = message.value() or b""
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            out.print(value.decode("utf-8", "replace"), markup=False, highlight=False)
            continue
        if pretty:
            out.print(f"[dim]{message.partition()}:{message.offset()}[/]", end=" ")
            out.print_json(data=doc)
        else:
            sys.stdout.write(orjson.dumps(doc).decode() + "\n")
            sys.stdout.flush()


def _tool_client(config: Path | None, bootstrap: str | None) -> dict[str, object]:
    """The librdkafka settings of `produce`/`tail`: the config's (file or STREAMER_* env) SASL/TLS and client."""
    from streamer.kafka.client_config import tool_config

    return tool_config(_settings(config).kafka, bootstrap)


@app.command()
def compress(
    sources: Annotated[
        list[Path] | None, typer.Argument(help="model directory (default: SmolLM2); with --report: artifacts")
    ] = None,
    recipe: Annotated[
        list[str] | None,
        typer.Option("--recipe", "-r", help="distil, lowrank, prune-magnitude, prune-2:4, then one of "
                     "int8-dynamic (CPU), int8-weight, int4-weight, fp8 (CUDA); repeat to compose"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="artifact directory to write")] = None,
    report: Annotated[bool, typer.Option(help="print the figures of the artifacts given side by side")] = False,
    force: Annotated[bool, typer.Option(help="keep the artifact even if it fails the quality gate")] = False,
    corpus: Annotated[
        Path | None, typer.Option(help="training texts: JSONL with 'text' (`streamer tail`) or .txt")
    ] = None,
    corpus_topic: Annotated[
        str | None, typer.Option(help="training texts: the 'text' of the events recorded in this Kafka topic")
    ] = None,
    corpus_max: Annotated[int | None, typer.Option(help="--corpus-topic: read at most this many records")] = None,
    bootstrap: BootstrapOption = None,
    config: ConfigOption = None,
    target_params: Annotated[float, typer.Option(help="lowrank: fraction of the parameters to keep")] = 0.7,
    energy: Annotated[float | None, typer.Option(help="lowrank: energy threshold instead of a target")] = None,
    sparsity: Annotated[float, typer.Option(help="prune-magnitude: fraction of weights zeroed")] = 0.5,
    keep_layers: Annotated[float, typer.Option(help="distil: fraction of the teacher's layers kept")] = 0.5,
    steps: Annotated[int, typer.Option(help="distil: training steps")] = 200,
    recover_steps: Annotated[int, typer.Option(help="lowrank/prune: recovery fine-tune steps")] = 0,
    batch_size: int = 8,
    seq_len: int = 128,
    lr: float = 1e-4,
    checkpoints: Annotated[Path | None, typer.Option(help="checkpoint folder (resumes from it)")] = None,
    max_ppl_ratio: Annotated[float, typer.Option(help="gate: max perplexity / source perplexity")] = 1.3,
    min_agreement: Annotated[float, typer.Option(help="gate: min greedy-token agreement")] = 0.8,
    eval_prompts: Annotated[int, typer.Option(help="held-out prompts for agreement (max 200)")] = 200,
    device: str = "auto",
    threads: int | None = None,
) -> None:
    """Compress a model, measure it against the source side by side, gate it and write an artifact."""
    from streamer.compress.command import GATE_EXIT, run_compress
    from streamer.compress.corpus import TopicCorpus
    from streamer.compress.distil import TrainOptions
    from streamer.compress.errors import GateFailed
    from streamer.compress.gate import Bounds

    if corpus is not None and corpus_topic is not None:
        raise _fail(ConfigError("give --corpus or --corpus-topic, not both"), 2)
    try:
        if corpus_topic is not None:
            corpus = TopicCorpus(corpus_topic, _tool_client(config, bootstrap), corpus_max)
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    try:
        run_compress(
            sources or [], report=report, recipes=recipe or [], out=out, threads=threads,
            train=TrainOptions(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr),
            bounds=Bounds(max_ppl_ratio=max_ppl_ratio, min_agreement=min_agreement),
            force=force, corpus=corpus, target_params=target_params, energy=energy, sparsity=sparsity,
            keep_layers=keep_layers, recover_steps=recover_steps, checkpoints=checkpoints,
            eval_prompts=eval_prompts, device=device,
        )
    except GateFailed as exc:
        raise _fail(exc, GATE_EXIT) from None
    except (StreamerError, OSError) as exc:
        raise _fail(exc) from None


@app.command()
def schemas(
    out: Annotated[Path, typer.Option(help="folder for the JSON Schema files")] = SCHEMAS_DIR,
) -> None:
    """Write the JSON Schema of every contract (input event, answer, dead letter)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in render_schemas().items():
        (out / f"{name}.json").write_text(text)
        console.print(f"wrote {out / f'{name}.json'}")


def render_schemas() -> dict[str, str]:
    """The schema files' exact text, so the drift test and the command agree byte for byte."""
    return {name: json.dumps(model.model_json_schema(), indent=2) + "\n" for name, model in CONTRACTS.items()}


def _describe_route(route: Route) -> str:
    text = f"{route.input} -[{route.task}]-> {route.output or '(no answers)'}"
    if route.stream:
        text += f" (streamed to Redis{' and ' + route.partial_output if route.partial_output else ''})"
    if route.window is not None:
        text += f" + {route.window.kind} {route.window.task} windows -> {route.window.output}"
    return text


@app.command("check-config")
def check_config(config: Annotated[Path | None, typer.Argument()] = None) -> None:
    """Validate the settings (file and STREAMER_ environment) without starting anything."""
    try:
        settings = _settings(config)
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    routes = "; ".join(_describe_route(r) for r in settings.routes)
    kafka = settings.kafka.bootstrap_servers or "embedded mock cluster"
    console.print(f"config ok: kafka {kafka}; routes {routes}", markup=False)
