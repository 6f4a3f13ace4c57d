"""The one settings tree: a YAML file, overridden by `STREAMER_...` environment variables.

Validated once at start; unknown keys are errors and every message names the field, so a typo fails
loudly instead of silently falling back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from streamer.errors import ConfigError
from streamer.tasks.event import TASKS, TaskName
from streamer.tasks.schemas import ExtractSchema, SchemaError
from streamer.tasks.window import WindowTaskName


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KafkaSasl(_Section):
    """SASL login (over TLS when `kafka.tls` is set, else in plain text)."""

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    username: str
    password: SecretStr


class TlsSettings(_Section):
    """TLS to a server: whom to trust, whether to check its name, and an optional client certificate."""

    ca_file: Path | None = Field(None, description="PEM CA bundle; null: the system trust store")
    cert_file: Path | None = Field(None, description="PEM client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="PEM private key of cert_file")
    key_password: SecretStr | None = None
    verify_hostname: bool = Field(True, description="false accepts a valid certificate for another name")

    @model_validator(mode="after")
    def _cert_with_key(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class KafkaSettings(_Section):
    bootstrap_servers: str | None = Field(
        None, description="null runs on librdkafka's built-in mock cluster (the embedded default)"
    )
    group_id: str = "streamer"
    dead_letter_topic: str = "streamer.dead-letters"
    partitions: int = Field(3, ge=1, description="for topics streamer creates")
    replication_factor: int = Field(1, ge=1)
    commit_interval_ms: int = Field(1000, ge=10)
    client: dict[str, str | int | bool] = Field(
        default_factory=dict, description="extra librdkafka settings (applied last)"
    )
    sasl: KafkaSasl | None = Field(None, description="null: no SASL login")
    tls: TlsSettings | None = Field(None, description="null: plain TCP")


class RedisSettings(_Section):
    url: SecretStr | None = Field(None, description="null starts an embedded redis-server; rediss:// for TLS")
    username: str | None = Field(None, description="ACL user; overrides the URL's")
    password: SecretStr | None = Field(None, description="AUTH password; overrides the URL's")
    tls: TlsSettings | None = Field(None, description="TLS options; set: TLS even for a redis:// URL")
    prefix: str = "streamer"
    answer_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="lifetime of per-event, per-key and per-window keys")
    stream_maxlen: int = Field(10_000, ge=10)
    window_index_max: int = Field(1000, ge=1, description="window ids kept per (route, key) index; older ones trimmed")
    latest_keys_max: int = Field(10_000, ge=1, description="keys kept in windows:latest:{route}; least recent dropped")


class ModelSettings(_Section):
    path: Path | None = Field(None, description="a local HF model directory; null = SmolLM2-135M-Instruct")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: Path = Path.home() / ".cache" / "streamer" / "models"
    threads: int | None = Field(None, ge=1, description="torch threads on CPU; null = torch's default")
    device_map: Literal["auto"] | dict[str, int | str] | None = Field(
        None, description="split a model too big for one device: auto, or module name -> device (accelerate)")

    @field_validator("path", "cache_dir")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class BatchingSettings(_Section):
    max_batch: int = Field(16, ge=1)
    max_batch_tokens: int = Field(8192, ge=1)
    max_wait_ms: float = Field(20.0, ge=0)
    max_queue: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> BatchingSettings:
        if self.max_queue < self.max_batch:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_batch ({self.max_batch})")
        return self


class OpenAISettings(_Section):
    """engine.kind openai: a remote OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, ...) batches; streamer
    orders what it sends (earliest deadline first, a token budget, an adaptive concurrency limit)."""

    base_url: str | None = Field(None, pattern=r"^https?://", description="e.g. http://vllm:8000/v1")
    model: str | None = Field(None, min_length=1, description="a model the server lists at /models")
    api_key: SecretStr | None = Field(None, description="sent as a Bearer token; never logged")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0, description="longest silence while reading an answer (between "
                                  "streamed pieces); past it the request is retried")
    max_concurrency: int = Field(16, ge=1, description="requests in flight at most; the limit adapts below it")
    min_concurrency: int = Field(1, ge=1, description="the adaptive limit's floor")
    max_inflight_tokens: int = Field(65_536, ge=1, description="prompt + answer tokens in flight at most")
    latency_tolerance: float = Field(3.0, gt=1, description="a first token slower than this many times the "
                                     "measured baseline lowers the concurrency limit")
    retry_base_s: float = Field(0.2, gt=0, description="first retry's backoff; doubles per attempt, jittered")
    retry_max_s: float = Field(10.0, gt=0, description="longest backoff between retries (a Retry-After may be "
                               "longer, up to 6 times this)")
    max_request_failures: int = Field(4, ge=1, description="failures of one request while the server answers "
                                      "others, after which it is a model_error dead letter")
    circuit_failures: int = Field(5, ge=1, description="consecutive failures that open the circuit")
    circuit_open_s: float = Field(2.0, gt=0, description="an open circuit waits this long before a probe")
    classify: Literal["auto", "logprobs", "choice"] = Field(
        "auto", description="logprobs: label log-probabilities; choice: a json_schema enum of the labels; "
        "auto: logprobs while the server returns them")
    tokenizer: Path | None = Field(
        None, description="tokenizer.json (or its directory) for local token counts; null: the default model's")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> OpenAISettings:
        if self.min_concurrency > self.max_concurrency:
            raise ValueError(f"min_concurrency ({self.min_concurrency}) must be <= max_concurrency "
                             f"({self.max_concurrency})")
        if self.retry_base_s > self.retry_max_s:
            raise ValueError(f"retry_base_s ({self.retry_base_s}) must be <= retry_max_s ({self.retry_max_s})")
        return self


class EngineSettings(_Section):
    """How the resident worker batches: a continuous-batching engine over a paged KV cache, or static batches;
    or (kind openai) which remote server runs the model instead, with `model:` settings unused."""

    kind: Literal["auto", "continuous", "static", "openai"] = Field(
        "auto", description="auto: continuous for Llama-family models, static batches of generate otherwise; "
        "openai: a remote OpenAI-compatible server (engine.openai)")
    openai: OpenAISettings = OpenAISettings()
    block_size: int = Field(16, ge=1, description="token slots per KV-cache block")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="KV cache size; null: 90% of free GPU memory, or a quarter of free RAM up to 1 GiB")
    max_running: int = Field(32, ge=1, description="sequences decoding together")
    max_step_tokens: int = Field(512, ge=1, description="prefill + decode tokens per model step (chunked prefill)")
    pinned_sessions: int = Field(
        64, ge=0, description="chat sessions whose last turn's KV blocks are kept for their next turn (least "
        "recently used unpinned first; pins also give way whenever running work needs the blocks); 0: none")
    target_step_ms: float | None = Field(
        None, gt=0, description="size steps from measured latency to stay under this; null: max_step_tokens")
    default_deadline_ms: float = Field(
        60_000, gt=0, description="deadline of requests without one (route slo_ms / params.deadline_ms)")
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="engine processes, one per device; auto: one per CUDA device, in-process on CPU")
    own_process: bool = Field(
        False, description="one engine runs in a process of its own too (as workers > 1 do): on CPU its steps run "
        "~1.3x faster there, since torch's OpenMP kernels lose ~30% on a second thread of a process whose first "
        "thread ran them (bench/peers.py); costs a child's start-up and its own copy of the weights")

    @model_validator(mode="after")
    def _openai_named(self) -> EngineSettings:
        missing = [name for name in ("base_url", "model") if getattr(self.openai, name) is None]
        if self.kind == "openai" and missing:
            raise ValueError(f"engine.kind openai needs engine.openai.{' and engine.openai.'.join(missing)}")
        return self


class LimitsSettings(_Section):
    """What an input may hold and an output may weigh; past them, a dead letter with its own code."""

    max_chars: int = Field(4000, ge=1)
    max_new_tokens: int = Field(512, ge=1, description="cap on any request's max_new_tokens")
    max_prompts: int = Field(64, ge=1, description="prompts in one /v1/completions request (streamer serve)")
    max_meta_bytes: int = Field(16_384, ge=2, description="an event's `meta` as JSON; more is a `schema` dead letter")
    max_meta_depth: int = Field(32, ge=1, le=200, description="nesting of `meta`; deeper is a `schema` dead letter")
    max_record_bytes: int = Field(
        1_000_000, ge=4096, description="an output record, key and framing included (librdkafka's message.max.bytes "
        "default; kafka.client's message.max.bytes lowers it); an answer past it becomes a `too_large` dead letter")
    max_event_skew_ms: int = Field(
        3_600_000, ge=0, description="event time further ahead of its record's timestamp (or of processing time, if "
        "earlier) is a `future` dead letter and moves no watermark (the broker default of KIP-937's "
        "message.timestamp.after.max.ms)")


MAX_WINDOWS_PER_EVENT = 1000
"""A sliding window's size_ms / slide_ms: each event joins that many windows."""


class WindowSettings(_Section):
    """Event-time windows per (route, key); see streamer/windows/assign.py for the exact semantics."""

    kind: Literal["tumbling", "sliding", "session"] = "tumbling"
    size_ms: int | None = Field(None, ge=1, description="tumbling and sliding")
    slide_ms: int | None = Field(None, ge=1, description="sliding: a new window starts every slide_ms")
    gap_ms: int | None = Field(None, ge=1, description="session: a session ends after this long without an event")
    max_duration_ms: int = Field(
        86_400_000, ge=1, description="session: longest span of a session; an event past it starts the next session "
        "(a session never closing would keep its partition's offsets uncommitted for ever)")
    allowed_lateness_ms: int = Field(0, ge=0, description="the watermark trails the highest event time by this")
    idle_timeout_ms: int = Field(10_000, ge=1, description="a partition silent this long stops holding windows")
    task: WindowTaskName = "count"
    per_key: bool = Field(True, description="false: one window across all keys (counts distinct keys)")
    emit: Literal["final", "update"] = "final"
    update_every_events: int = Field(100, ge=1, description="emit: update")
    update_every_s: float = Field(5.0, gt=0, description="emit: update")
    max_events: int = Field(1000, ge=2, description="summarize: texts held before they are folded into a summary")
    max_tokens: int = Field(1500, ge=16, description="summarize: prompt tokens held before folding")
    summary_tokens: int = Field(96, ge=8, description="summarize: max_new_tokens of a summary")
    panes: bool = Field(True, description="sliding summarize, size a multiple of slide: summarise each slide-long "
                        "pane once and combine a window's pane summaries (false: summarise each window's texts)")
    output: str = Field(description="topic of the window results (message key = window id)")
    late_topic: str | None = Field(None, description="null: the dead-letter topic, with code `late`")

    @model_validator(mode="after")
    def _shape(self) -> WindowSettings:
        if self.kind in ("tumbling", "sliding") and self.size_ms is None:
            raise ValueError(f"a {self.kind} window needs size_ms")
        if self.kind == "sliding" and (self.slide_ms is None or self.slide_ms > (self.size_ms or 0)):
            raise ValueError("a sliding window needs 0 < slide_ms <= size_ms")
        if self.kind == "sliding" and (self.size_ms or 0) > MAX_WINDOWS_PER_EVENT * (self.slide_ms or 1):
            raise ValueError(f"a sliding window puts each event in size_ms / slide_ms windows; at most "
                             f"{MAX_WINDOWS_PER_EVENT} (got {self.size_ms} / {self.slide_ms})")
        if self.kind == "session" and self.max_duration_ms < (self.gap_ms or 0):
            raise ValueError("a session window needs max_duration_ms >= gap_ms")
        if self.kind == "session" and self.gap_ms is None:
            raise ValueError("a session window needs gap_ms")
        return self


class Route(_Section):
    """One input topic, the per-event task run on its events, where answers go, and an optional window."""

    name: str
    input: str = Field(pattern=r"^[A-Za-z0-9._-]{1,249}$",
                       description="one Kafka topic name (a pattern such as `^events-.*` is not supported)")
    task: TaskName = "answer"
    output: str | None = Field(None, description="topic of per-event answers; needed unless task is `none`")
    max_new_tokens: int = Field(64, ge=1)
    system_prompt: str | None = None
    template: str | None = Field(None, description="for `prompt`: text with one `{text}` placeholder")
    labels: list[str] = Field(default_factory=list, description="for `classify`")
    target_lang: str = Field("French", description="for `translate`")
    slo_ms: int | None = Field(None, ge=1, description="answers slower than this count as SLO misses")
    event_deadlines: bool = Field(
        False, description="order admission by the events' own params.deadline_ms; off: by slo_ms, so no producer "
        "can jump the queue")
    window: WindowSettings | None = None
    stream: bool = Field(False, description="write answers out as they are generated: a Redis stream per event "
                         "(`partial:{route}:{id}`) and, with partial_output, delta records; the answer is written "
                         "as ever")
    partial_output: str | None = Field(None, description="stream: topic of the delta records (key = event key); "
                                       "at-least-once only")
    max_history_tokens: int = Field(1024, ge=16, description="chat: tokens of a conversation's history (summary and "
                                    "turns) past which its oldest turns are folded into the running summary")
    extract_schema: dict[str, Any] | str | None = Field(
        None, alias="schema", description="extract: the JSON Schema answers match, inline or the path of a JSON file "
        "(relative to the config file); checked at load")
    count_field: str | None = Field(
        None, description="extract on a windowed route: a property of the schema (an enum) whose values each window "
        "counts in its `labels`")
    _schema: ExtractSchema | None = PrivateAttr(None)

    @property
    def schema_spec(self) -> ExtractSchema | None:
        """The route's schema, loaded and checked (None without `schema`)."""
        return self._schema

    @model_validator(mode="after")
    def _task_needs(self) -> Route:
        if self.extract_schema is not None:
            try:
                self._schema = ExtractSchema.load(self.extract_schema)
            except SchemaError as exc:
                raise ValueError(f"route {self.name!r}: schema: {exc}") from None
        if (problem := TASKS[self.task].problem(self)) is not None:
            raise ValueError(problem)
        return self


class ObserveSettings(_Section):
    """Where the service shows itself: metrics, health, the dashboard, and how it logs."""

    http_host: str = Field("127.0.0.1", description="0.0.0.0 serves every interface: set auth_token then")
    http_port: int | None = Field(9400, ge=1, le=65535, description="metrics, health, dashboard; null: off")
    auth_token: SecretStr | None = Field(
        None, description="bearer token the dashboard (/ and /api/*) asks for; null: none (metrics, probes stay open)")
    max_live_streams: int = Field(16, ge=1, description="dashboard live-update streams served at once; more get 503")
    json_logs: bool = Field(False, description="one JSON object per log line, with the run id")


class PartialSettings(_Section):
    """How the pieces of streaming routes' answers are written: batched per event, best effort, bounded."""

    flush_ms: float = Field(50.0, gt=0, description="pieces of an event are written together this often at most")
    max_buffered_chars: int = Field(1_000_000, ge=1, description="text waiting to be written; pieces past it are "
                                    "dropped (counted), so a slow Redis or broker never grows memory")
    write_timeout_s: float = Field(2.0, gt=0, description="a write of pieces that takes longer is dropped (counted)")
    ttl_s: int = Field(3600, ge=1, description="lifetime of an event's `partial:{route}:{id}` stream after its "
                       "last piece")


class ProcessingSettings(_Section):
    """What the service promises about duplicates; see RELIABILITY.md."""

    guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once", description="exactly_once: outputs and offsets in one Kafka transaction per commit interval")
    transactional_id: str | None = Field(
        None, description="exactly_once: stable per instance (e.g. the pod name) so a restart fences its "
        "predecessor at once; null: group_id plus a random suffix per process")
    transaction_timeout_ms: int = Field(60_000, ge=1000, description="exactly_once: the broker aborts older ones")
    stall_timeout_s: float = Field(
        300.0, gt=0, description="/healthz fails when input waits and nothing is consumed or committed this long "
        "(outages of Redis or Kafka aside), or when the consumer is out of its group this long")
    reuse_answers: bool = Field(
        True, description="answer an event whose answer Redis holds (same route, id and content) from Redis "
        "without a model call: replays and duplicate sends cost no model time; kept redis.answer_ttl_s")


def _default_routes() -> list[Route]:
    return [Route(name="questions", input="questions", output="answers")]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMER_",
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    model: ModelSettings = ModelSettings()
    batching: BatchingSettings = BatchingSettings()
    engine: EngineSettings = EngineSettings()
    limits: LimitsSettings = LimitsSettings()
    observe: ObserveSettings = ObserveSettings()
    processing: ProcessingSettings = ProcessingSettings()
    partials: PartialSettings = PartialSettings()
    routes: list[Route] = Field(default_factory=_default_routes, min_length=1)
    shutdown_timeout_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _routes_distinct(self) -> Settings:
        inputs = [r.input for r in self.routes]
        if len(set(inputs)) != len(inputs):
            raise ValueError("two routes read the same input topic")
        names = [r.name for r in self.routes]
        if len(set(names)) != len(names):
            raise ValueError("route names must be unique")
        self._no_output_feeds_an_input(set(inputs))
        return self

    def _no_output_feeds_an_input(self, inputs: set[str]) -> None:
        """A dead letter read back as input is invalid input, whose dead letter is read back again: one bad
        record would loop for ever, growing with each round of escaping. A route's own results read back
        are invalid input too."""
        if self.kafka.dead_letter_topic in inputs:
            raise ValueError(f"kafka.dead_letter_topic {self.kafka.dead_letter_topic!r} is also a route's input: "
                             "every dead letter would come back as input and make another, for ever")
        for route in self.routes:
            self._partials_apart(route, inputs)
            own = {"output": route.output}
            if route.window is not None:
                own |= {"window.output": route.window.output, "window.late_topic": route.window.late_topic}
            for field, topic in own.items():
                if topic is not None and (topic in inputs if field == "window.late_topic" else topic == route.input):
                    raise ValueError(f"route {route.name}: {field} {topic!r} is also an input topic; "
                                     "its records would come back as invalid input")

    def _partials_apart(self, route: Route, inputs: set[str]) -> None:
        """Delta records are progress, not results: read back as input they would be invalid events, in the
        dead-letter topic they would read as failures. Exactly once, the producer is transactional and a
        delta inside a transaction would show only at the commit, when the answer does: nothing streams."""
        topic = route.partial_output
        if topic is None:
            return
        if topic in inputs or topic == self.kafka.dead_letter_topic:
            what = "an input topic" if topic in inputs else "the dead-letter topic"
            raise ValueError(f"route {route.name}: partial_output {topic!r} is {what}")
        if topic in {route.output, route.window and route.window.output}:
            raise ValueError(f"route {route.name}: partial_output {topic!r} is also where its results go")
        if self.processing.guarantee == "exactly_once":
            raise ValueError(f"route {route.name}: partial_output is not offered with processing.guarantee "
                             "exactly_once (its partial:{route}:{id} stream in Redis is)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init values; the environment overrides it.
        return env_settings, init_settings


def load_settings(path: Path | None) -> Settings:
    """Read and validate the settings; raise ConfigError naming each bad field."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
        _schema_paths_from(data, path.parent)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _schema_paths_from(data: dict[str, Any], base: Path) -> None:
    """Make routes' schema file paths relative to the config file's folder, not to wherever streamer starts."""
    for route in data.get("routes") or ():
        if isinstance(route, dict) and isinstance(where := route.get("schema"), str):
            route["schema"] = str(base / Path(where).expanduser())


def _describe(error: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid settings{where}:"]
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)
