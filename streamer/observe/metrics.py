"""Prometheus metrics of one streamer process, named as ops/grafana/dashboards/streamer.json queries them.

Every `Metrics` owns its `CollectorRegistry`, so tests, benchmarks and several pipelines in one
process never see each other's series. Call sites use the intention-revealing methods
(`metrics.answered(route, latency_s, tokens_out)`) and never touch the instruments directly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics import MetricWrapperBase

from streamer.engine.backend import recipes

# From a single short answer to a long generation queued behind others.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class _EventSeries:
    """Per-route flow of events, from consumed to answered or dead-lettered."""

    events_in: Counter
    answered: Counter
    dead_lettered: Counter
    late: Counter
    slo_misses: Counter
    e2e_latency_s: Histogram
    first_token_s: Histogram
    output_tokens: Counter
    answer_cache_hits: Counter


@dataclass(frozen=True)
class _ModelSeries:
    """The batcher and the resident model: how full, how fast, how much memory."""

    batch_size: Histogram
    model_latency_s: Histogram
    queue_depth: Gauge
    inflight_tokens: Gauge
    model_memory_bytes: Gauge
    model: Info
    model_figures: Gauge
    cuda_memory_bytes: Gauge
    kv_blocks: Gauge
    prefix_reused_tokens: Counter


@dataclass(frozen=True)
class _RemoteSeries:
    """A remote model server (engine.kind openai), by its base URL."""

    request_latency_s: Histogram
    first_token_s: Histogram
    retries: Counter
    circuit: Gauge
    concurrency_limit: Gauge


@dataclass(frozen=True)
class _StreamSeries:
    """Kafka consumption and event-time windows."""

    consumer_lag: Gauge
    open_windows: Gauge
    windows_emitted: Counter
    windows_mixed: Counter
    offsets_pending: Gauge
    outcomes_held: Gauge
    partials_written: Counter
    partials_dropped: Counter


def _event_series(registry: CollectorRegistry) -> _EventSeries:
    route = ["route"]
    return _EventSeries(
        events_in=Counter("streamer_events_in", "Events consumed from input topics.", route, registry=registry),
        answered=Counter("streamer_answered", "Answers fully produced.", route, registry=registry),
        dead_lettered=Counter("streamer_dead_lettered", "Events sent to the dead-letter topic, by error code.",
                              ["route", "code"], registry=registry),
        late=Counter("streamer_late", "Events behind their route's watermark.", route, registry=registry),
        slo_misses=Counter("streamer_slo_misses", "Answers slower than the latency objective.", route,
                           registry=registry),
        e2e_latency_s=Histogram("streamer_e2e_latency_seconds", "Event consumed to answer ready.", route,
                                buckets=LATENCY_BUCKETS_S, registry=registry),
        first_token_s=Histogram("streamer_time_to_first_token_seconds",
                                "Request queued to its first generated token (continuous engine).", route,
                                buckets=LATENCY_BUCKETS_S, registry=registry),
        output_tokens=Counter("streamer_output_tokens", "Tokens generated (rate() gives tokens/s).",
                              registry=registry),
        answer_cache_hits=Counter("streamer_answer_cache_hits", "Answers reused from Redis instead of asking the "
                                  "model (replays, duplicate sends).", route, registry=registry),
    )


def _model_series(registry: CollectorRegistry) -> _ModelSeries:
    return _ModelSeries(
        batch_size=Histogram("streamer_batch_size", "Requests per model batch.", buckets=BATCH_SIZE_BUCKETS,
                             registry=registry),
        model_latency_s=Histogram("streamer_model_latency_seconds", "Time the model took per batch.",
                                  buckets=LATENCY_BUCKETS_S, registry=registry),
        queue_depth=Gauge("streamer_queue_depth", "Requests waiting for the model.", registry=registry),
        inflight_tokens=Gauge("streamer_inflight_tokens", "Prompt tokens queued or running.", registry=registry),
        model_memory_bytes=Gauge("streamer_model_memory_bytes", "Bytes of the resident model's weights.",
                                 registry=registry),
        model=Info("streamer_model", "The model served: its name, and a compressed artifact's recipe, source and "
                   "source hash (from its manifest).", registry=registry),
        model_figures=Gauge("streamer_model_figure", "A compressed artifact's figures as `streamer compress` "
                            "measured them (its manifest), for the artifact (of=model) and its source.",
                            ["figure", "of"], registry=registry),
        cuda_memory_bytes=Gauge("streamer_cuda_memory_bytes", "CUDA memory this process holds, per device.",
                                ["device"], registry=registry),
        kv_blocks=Gauge("streamer_kv_blocks", "KV-cache blocks by state: used (owned by sequences) or total.",
                        ["state"], registry=registry),
        prefix_reused_tokens=Counter("streamer_prefix_reused_tokens",
                                     "Prompt tokens taken from the prefix cache instead of computed.",
                                     registry=registry),
    )


def _remote_series(registry: CollectorRegistry) -> _RemoteSeries:
    server = ["server"]
    return _RemoteSeries(
        request_latency_s=Histogram("streamer_remote_request_seconds", "One successful call to the model server.",
                                    server, buckets=LATENCY_BUCKETS_S, registry=registry),
        first_token_s=Histogram("streamer_remote_first_token_seconds", "A call sent to its first generated token.",
                                server, buckets=LATENCY_BUCKETS_S, registry=registry),
        retries=Counter("streamer_remote_retries", "Calls to the model server tried again, by cause (timeout, "
                        "connection, server_error, overloaded, auth).", ["server", "cause"], registry=registry),
        circuit=Gauge("streamer_remote_circuit", "The circuit to the model server: 1 in the state it is in "
                      "(closed, open, half_open), 0 in the others.", ["server", "state"], registry=registry),
        concurrency_limit=Gauge("streamer_remote_concurrency_limit", "Calls the adaptive limit lets be in flight.",
                                server, registry=registry),
    )


def _stream_series(registry: CollectorRegistry) -> _StreamSeries:
    return _StreamSeries(
        consumer_lag=Gauge("streamer_consumer_lag", "Messages behind the partition's end.",
                           ["topic", "partition"], registry=registry),
        open_windows=Gauge("streamer_open_windows", "Windows not closed yet.", ["route"], registry=registry),
        windows_emitted=Counter("streamer_windows_emitted", "Final window results written.", ["route"],
                                registry=registry),
        windows_mixed=Counter("streamer_windows_mixed_partitions",
                              "Final windows holding events of several input partitions (a rebalance "
                              "can split them: key the input by the window key).", ["route"], registry=registry),
        offsets_pending=Gauge("streamer_offsets_pending",
                              "Events between a partition's commit point and its last consumed one: what the "
                              "offset ledger holds (and a restart would replay).", ["topic", "partition"],
                              registry=registry),
        outcomes_held=Gauge("streamer_outcomes_held",
                            "Outcomes written only once earlier events of their partitions are (exactly once: "
                            "all; at least once: session windows).", registry=registry),
        partials_written=Counter("streamer_partials_written", "Deltas of streaming routes' answers written "
                                 "(to Redis, and to Kafka where the route has a partial_output).", ["route"],
                                 registry=registry),
        partials_dropped=Counter("streamer_partials_dropped", "Pieces or deltas of answers not written as progress "
                                 "(the answer itself is written as ever), by why: buffer (full), redis, kafka, "
                                 "unwritable, superseded (a newer run of the event).",
                                 ["route", "reason"], registry=registry),
    )


class Metrics:
    """The instruments of one process and the verbs its stages report through."""

    CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
    """What `render()` produces: the classic text format every Prometheus version scrapes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._events = _event_series(self.registry)
        self._model = _model_series(self.registry)
        self._stream = _stream_series(self.registry)
        self._remote = _remote_series(self.registry)
        self._reused_reported = 0
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def _per_event(self, metric: MetricWrapperBase, *values: str) -> Any:
        """The metric's child for these label values, looked up once: `labels()` locks and checks its values on
        every call, which was 10% of consuming on the window route. For series never removed."""
        child = self._children.get((metric, values))
        if child is None:
            child = self._children[(metric, values)] = metric.labels(*values)
        return child

    def events_in(self, route: str, n: int = 1) -> None:
        self._per_event(self._events.events_in, route).inc(n)

    def answered(self, route: str, latency_s: float, tokens_out: int) -> None:
        self._per_event(self._events.answered, route).inc()
        self._per_event(self._events.e2e_latency_s, route).observe(latency_s)
        self._events.output_tokens.inc(tokens_out)

    def answer_reused(self, route: str, latency_s: float) -> None:
        """An answer taken from Redis: answered (no tokens generated), and counted as a hit."""
        self.answered(route, latency_s, 0)
        self._events.answer_cache_hits.labels(route).inc()

    def dead_lettered(self, route: str, code: str) -> None:
        self._per_event(self._events.dead_lettered, route, code).inc()

    def late(self, route: str) -> None:
        self._per_event(self._events.late, route).inc()

    def slo_miss(self, route: str) -> None:
        self._events.slo_misses.labels(route).inc()

    def batch_done(self, size: int, model_s: float) -> None:
        self._model.batch_size.observe(size)
        self._model.model_latency_s.observe(model_s)

    def first_token(self, route: str, seconds: float) -> None:
        self._events.first_token_s.labels(route).observe(seconds)

    def kv_cache(self, used_blocks: int, total_blocks: int, reused_tokens_total: int) -> None:
        self._model.kv_blocks.labels("used").set(used_blocks)
        self._model.kv_blocks.labels("total").set(total_blocks)
        if reused_tokens_total > self._reused_reported:  # the engine keeps a total; the counter wants steps
            self._model.prefix_reused_tokens.inc(reused_tokens_total - self._reused_reported)
            self._reused_reported = reused_tokens_total

    def queue(self, depth: int, inflight_tokens: int) -> None:
        self._model.queue_depth.set(depth)
        self._model.inflight_tokens.set(inflight_tokens)

    def model_memory(self, n_bytes: int) -> None:
        self._model.model_memory_bytes.set(n_bytes)

    def model_loaded(self, name: str, manifest: Mapping[str, Any] | None) -> None:
        """The served model, and what a compressed artifact's manifest says it is and measured."""
        self._model.model.info({
            "name": name,
            "recipe": recipes(manifest),
            "source": manifest["source"] if manifest else "",
            "source_sha256": manifest["source_sha256"] if manifest else "",
        })
        for of, key in (("model", "figures"), ("source", "source_figures")):
            for figure, value in ((manifest or {}).get(key) or {}).items():
                if value is not None:
                    self._model.model_figures.labels(figure, of).set(value)

    def remote_request(self, server: str, seconds: float) -> None:
        self._remote.request_latency_s.labels(server).observe(seconds)

    def remote_first_token(self, server: str, seconds: float) -> None:
        self._remote.first_token_s.labels(server).observe(seconds)

    def remote_retry(self, server: str, cause: str) -> None:
        self._remote.retries.labels(server, cause).inc()

    def remote_circuit(self, server: str, state: str) -> None:
        for each in ("closed", "open", "half_open"):
            self._remote.circuit.labels(server, each).set(1 if each == state else 0)

    def remote_limit(self, server: str, limit: int) -> None:
        self._remote.concurrency_limit.labels(server).set(limit)

    def lag(self, topic: str, partition: int, lag: int) -> None:
        self._stream.consumer_lag.labels(topic, str(partition)).set(lag)

    def forget_partitions(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Drop the lag of revoked partitions, so a partition another member owns now is not summed twice."""
        for topic, partition in partitions:
            for gauge in (self._stream.consumer_lag, self._stream.offsets_pending):
                with contextlib.suppress(KeyError):  # never reported for this partition
                    gauge.remove(topic, str(partition))

    def ledger(self, pending: Mapping[tuple[str, int], int], held: int) -> None:
        """What the offset ledger and the writer hold in memory."""
        for (topic, partition), n in pending.items():
            self._stream.offsets_pending.labels(topic, str(partition)).set(n)
        self._stream.outcomes_held.set(held)

    def open_windows(self, route: str, n: int) -> None:
        self._stream.open_windows.labels(route).set(n)

    def window_emitted(self, route: str) -> None:
        self._per_event(self._stream.windows_emitted, route).inc()

    def window_mixed(self, route: str) -> None:
        self._stream.windows_mixed.labels(route).inc()

    def partials_written(self, route: str, n: int) -> None:
        self._stream.partials_written.labels(route).inc(n)

    def partials_dropped(self, route: str, reason: str, n: int = 1) -> None:
        self._stream.partials_dropped.labels(route, reason).inc(n)

    def sample_device_memory(self) -> dict[str, int]:
        """Set the CUDA memory gauge from torch and return what was read ({} without CUDA)."""
        reserved = _cuda_reserved_bytes()
        for device, n_bytes in reserved.items():
            self._model.cuda_memory_bytes.labels(device).set(n_bytes)
        return reserved

    def render(self) -> bytes:
        """The text exposition of every series, with device memory sampled just now."""
        self.sample_device_memory()
        return generate_latest(self.registry)


def _cuda_reserved_bytes() -> dict[str, int]:
    """Memory torch's caching allocator holds per device (what other processes cannot use).

    Reads torch only if something already imported it: a process without the model loaded has no
    CUDA memory to report, and a scrape must not pay torch's import time.
    """
    torch: Any = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {f"cuda:{i}": int(torch.cuda.memory_reserved(i)) for i in range(torch.cuda.device_count())}
