"""The one settings tree: a YAML file, overridden by `STREAMER_...` environment variables.

Validated once at start; unknown keys are errors and every message names the field, so a typo fails
loudly instead of silently falling back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from streamer.errors import ConfigError

TASKS = ("answer", "classify", "translate", "prompt")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
        default_factory=dict, description="extra librdkafka settings, e.g. security.protocol"
    )


class RedisSettings(_Section):
    url: SecretStr | None = Field(None, description="null starts an embedded redis-server")
    prefix: str = "streamer"
    answer_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    stream_maxlen: int = Field(10_000, ge=10)


class ModelSettings(_Section):
    path: Path | None = Field(None, description="a local HF model directory; null = SmolLM2-135M-Instruct")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: Path = Path.home() / ".cache" / "streamer" / "models"
    threads: int | None = Field(None, ge=1, description="torch threads on CPU; null = torch's default")

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


class LimitsSettings(_Section):
    max_chars: int = Field(4000, ge=1)
    max_new_tokens: int = Field(512, ge=1, description="cap on any request's max_new_tokens")


class Route(_Section):
    """One input topic, the task run on its events and the topic answers go to."""

    name: str
    input: str
    task: Literal["answer", "classify", "translate", "prompt"] = "answer"
    output: str
    max_new_tokens: int = Field(64, ge=1)
    system_prompt: str | None = None
    template: str | None = Field(None, description="for `prompt`: text with one `{text}` placeholder")
    labels: list[str] = Field(default_factory=list, description="for `classify`")
    target_lang: str = Field("French", description="for `translate`")

    @model_validator(mode="after")
    def _task_needs(self) -> Route:
        if self.task == "prompt" and (self.template is None or "{text}" not in self.template):
            raise ValueError("a `prompt` route needs a `template` containing {text}")
        if self.task == "classify" and len(self.labels) < 2:
            raise ValueError("a `classify` route needs at least two `labels`")
        return self


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
    limits: LimitsSettings = LimitsSettings()
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
        return self

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
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _describe(error: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid settings{where}:"]
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)
