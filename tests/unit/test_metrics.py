"""Metrics: each verb moves its series, the exposition shows them, and instances share nothing."""

import sys
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamer.models.memory import resident_bytes
from streamer.observe.metrics import Metrics


def value(metrics: Metrics, series: str, /, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(series, labels)


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the rendered text, parsed back: proves render() is valid exposition."""
    text = metrics.render().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_event_verbs_move_their_series() -> None:
    m = Metrics()
    m.events_in("questions")
    m.events_in("questions")
    m.answered("questions", latency_s=0.3, tokens_out=12)
    m.answered("questions", latency_s=0.01, tokens_out=5)
    m.dead_lettered("questions", "schema")
    m.late("clicks")
    m.slo_miss("questions")
    assert value(m, "streamer_events_in_total", route="questions") == 2
    assert value(m, "streamer_answered_total", route="questions") == 2
    assert value(m, "streamer_output_tokens_total") == 17
    assert value(m, "streamer_e2e_latency_seconds_count", route="questions") == 2
    assert value(m, "streamer_e2e_latency_seconds_sum", route="questions") == pytest.approx(0.31)
    assert value(m, "streamer_e2e_latency_seconds_bucket", route="questions", le="0.025") == 1
    assert value(m, "streamer_dead_lettered_total", route="questions", code="schema") == 1
    assert value(m, "streamer_late_total", route="clicks") == 1
    assert value(m, "streamer_slo_misses_total", route="questions") == 1


def test_the_served_model_and_its_compression_manifest_are_exported() -> None:
    m = Metrics()
    figures = {"params": 100, "resident_bytes": 50, "tokens_per_s_b1": 40.0, "tokens_per_s_b32": 300.0,
               "perplexity": 31.0, "agreement": 0.91}
    m.model_loaded("smol-int8 (int8-dynamic of SmolLM2)", {
        "source": "SmolLM2", "source_sha256": "ab12", "steps": [{"recipe": "int8-dynamic"}],
        "figures": figures, "source_figures": {**figures, "resident_bytes": 200, "agreement": None},
    })
    assert value(m, "streamer_model_info", name="smol-int8 (int8-dynamic of SmolLM2)", recipe="int8-dynamic",
                 source="SmolLM2", source_sha256="ab12") == 1
    assert value(m, "streamer_model_figure", figure="agreement", of="model") == pytest.approx(0.91)
    assert value(m, "streamer_model_figure", figure="resident_bytes", of="source") == 200
    assert value(m, "streamer_model_figure", figure="agreement", of="source") is None  # not measured


def test_an_uncompressed_model_is_exported_with_no_recipe() -> None:
    m = Metrics()
    m.model_loaded("SmolLM2-135M-Instruct", None)
    assert value(m, "streamer_model_info", name="SmolLM2-135M-Instruct", recipe="none", source="",
                 source_sha256="") == 1


def test_model_and_stream_verbs_move_their_series() -> None:
    m = Metrics()
    m.batch_done(size=8, model_s=0.2)
    m.queue(depth=5, inflight_tokens=900)
    m.queue(depth=3, inflight_tokens=400)
    m.model_memory(270_000_000)
    m.lag("questions", 2, 41)
    m.open_windows("clicks", 7)
    m.window_emitted("clicks")
    assert value(m, "streamer_batch_size_count") == 1
    assert value(m, "streamer_batch_size_sum") == 8
    assert value(m, "streamer_model_latency_seconds_sum") == pytest.approx(0.2)
    assert value(m, "streamer_queue_depth") == 3
    assert value(m, "streamer_inflight_tokens") == 400
    assert value(m, "streamer_model_memory_bytes") == 270_000_000
    assert value(m, "streamer_consumer_lag", topic="questions", partition="2") == 41
    assert value(m, "streamer_open_windows", route="clicks") == 7
    assert value(m, "streamer_windows_emitted_total", route="clicks") == 1


def test_forgotten_partitions_leave_the_lag_gauge() -> None:
    m = Metrics()
    m.lag("questions", 0, 3)
    m.lag("questions", 1, 4)
    m.forget_partitions([("questions", 0), ("questions", 9)])  # 9 was never reported: no error
    assert value(m, "streamer_consumer_lag", topic="questions", partition="0") is None
    assert value(m, "streamer_consumer_lag", topic="questions", partition="1") == 4


def test_render_is_parseable_text_with_the_dashboard_names() -> None:
    m = Metrics()
    m.events_in("questions")
    m.answered("questions", 0.5, 3)
    m.dead_lettered("questions", "too_long")
    m.batch_done(4, 0.1)
    m.lag("questions", 0, 10)
    parsed = samples(m)
    assert parsed[("streamer_events_in_total", frozenset({("route", "questions")}))] == 1
    assert parsed[("streamer_dead_lettered_total", frozenset({("route", "questions"), ("code", "too_long")}))] == 1
    assert parsed[("streamer_consumer_lag", frozenset({("topic", "questions"), ("partition", "0")}))] == 10
    assert parsed[("streamer_batch_size_bucket", frozenset({("le", "4.0")}))] == 1
    text = m.render().decode()
    for name in ("streamer_e2e_latency_seconds_bucket", "streamer_model_latency_seconds_bucket",
                 "streamer_output_tokens_total", "streamer_queue_depth", "streamer_inflight_tokens"):
        assert name in text
    assert Metrics.CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_two_instances_share_no_state() -> None:
    a, b = Metrics(), Metrics()
    a.events_in("questions")
    a.queue(9, 99)
    assert value(a, "streamer_events_in_total", route="questions") == 1
    assert value(b, "streamer_events_in_total", route="questions") is None
    assert value(b, "streamer_queue_depth") == 0
    assert b"route=\"questions\"" not in b.render()


def test_device_memory_without_torch_loaded_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    m = Metrics()
    assert m.sample_device_memory() == {}
    assert b"streamer_cuda_memory_bytes{" not in m.render()


def test_device_memory_reads_each_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    reserved = {0: 1024, 1: 4096}
    cuda = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, device_count=lambda: 2,
                           memory_reserved=lambda i: reserved[i])
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    m = Metrics()
    assert m.sample_device_memory() == {"cuda:0": 1024, "cuda:1": 4096}
    reserved[0] = 2048
    m.render()  # a scrape samples again
    assert value(m, "streamer_cuda_memory_bytes", device="cuda:0") == 2048
    assert value(m, "streamer_cuda_memory_bytes", device="cuda:1") == 4096


def test_device_memory_is_skipped_when_cuda_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = SimpleNamespace(is_available=lambda: False)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    assert Metrics().sample_device_memory() == {}


def test_resident_bytes_counts_parameters_and_buffers() -> None:
    def tensor(n: int, size: int) -> SimpleNamespace:
        return SimpleNamespace(numel=lambda: n, element_size=lambda: size)

    model = SimpleNamespace(parameters=lambda: iter([tensor(10, 2), tensor(3, 4)]),
                            buffers=lambda: iter([tensor(5, 8)]))
    assert resident_bytes(model) == 10 * 2 + 3 * 4 + 5 * 8


def test_engine_verbs_report_first_token_and_kv_cache() -> None:
    m = Metrics()
    m.first_token("questions", 0.3)
    m.kv_cache(used_blocks=12, total_blocks=2048, reused_tokens_total=64)
    m.kv_cache(used_blocks=4, total_blocks=2048, reused_tokens_total=96)  # the engine reports its running total
    assert value(m, "streamer_time_to_first_token_seconds_count", route="questions") == 1
    assert value(m, "streamer_kv_blocks", state="used") == 4
    assert value(m, "streamer_kv_blocks", state="total") == 2048
    assert value(m, "streamer_prefix_reused_tokens_total") == 96
