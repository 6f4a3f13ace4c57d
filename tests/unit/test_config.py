"""Settings: YAML plus STREAMER_ environment; invalid settings fail at start naming the field."""

from pathlib import Path

import pytest

from streamer.config import load_settings
from streamer.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "examples" / "streamer.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "streamer.yaml"
    path.write_text(text)
    return path


def test_no_file_means_the_embedded_defaults():
    settings = load_settings(None)
    assert settings.kafka.bootstrap_servers is None
    assert settings.redis.url is None
    assert [(r.input, r.task, r.output) for r in settings.routes] == [("questions", "answer", "answers")]


def test_the_annotated_example_is_valid():
    assert load_settings(EXAMPLE).routes


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, "kafka: {bootstrap_servers: 'file:9092', group_id: g}\n")
    monkeypatch.setenv("STREAMER_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    monkeypatch.setenv("STREAMER_BATCHING__MAX_BATCH", "4")
    settings = load_settings(path)
    assert settings.kafka.bootstrap_servers == "env:9092"
    assert settings.kafka.group_id == "g"
    assert settings.batching.max_batch == 4


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("kafka: {group: x}\n", "kafka.group"),
        ("batching: {max_batch: 0}\n", "batching.max_batch"),
        ("batching: {max_batch: 32, max_queue: 8}\n", "batching"),
        ("routes: [{name: a, input: i, output: o, task: dance}]\n", "routes.0.task"),
        ("routes: [{name: a, input: i, output: o, task: classify}]\n", "routes.0"),
        ("routes: [{name: a, input: i, output: o, task: prompt, template: 'no placeholder'}]\n", "routes.0"),
        ("routes: []\n", "routes"),
        # librdkafka subscribes to a name starting with ^ as a pattern, whose records no route would own
        ("routes: [{name: a, input: '^events-.*', output: o}]\n", "routes.0.input"),
        ("surprise: 1\n", "surprise"),
    ],
)
def test_invalid_settings_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, text))
    assert f"  {field}" in str(error.value)


def test_unreadable_or_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "kafka: [unclosed\n"))


def test_a_sliding_window_putting_an_event_in_more_than_a_thousand_windows_is_refused() -> None:
    """Review finding 27: size 1 day with slide 1 ms put each event in 86.4 M windows."""
    from streamer.config import Settings

    route = {"name": "r", "input": "in", "task": "none"}
    Settings(routes=[{**route, "window": {"kind": "sliding", "size_ms": 60_000, "slide_ms": 60, "output": "w"}}])
    with pytest.raises(ValueError, match="size_ms / slide_ms"):
        Settings(routes=[{**route, "window": {"kind": "sliding", "size_ms": 86_400_000, "slide_ms": 1,
                                               "output": "w"}}])


@pytest.mark.parametrize("overrides", [
    {"kafka": {"dead_letter_topic": "in2"}},
    {"route": {"output": "in"}},
    {"window": {"output": "in"}},
    {"window": {"late_topic": "in2"}},
], ids=["dead letters", "answers", "window results", "late records"])
def test_an_output_topic_that_is_also_an_input_is_refused(overrides) -> None:
    """Adversarial review, finding 6: with the dead-letter topic among the inputs, one bad record made a
    dead letter, read back as another bad record, for ever (246 bytes growing to 521 KB by round 40)."""
    from streamer.config import Settings

    route = {"name": "r", "input": "in", "task": "answer", "output": "answers", **overrides.get("route", {}),
             "window": {"kind": "tumbling", "size_ms": 1000, "output": "w", **overrides.get("window", {})}}
    other = {"name": "s", "input": "in2", "task": "answer", "output": "answers2"}
    with pytest.raises(ValueError, match="input"):
        Settings(kafka={"dead_letter_topic": "dlq", **overrides.get("kafka", {})}, routes=[route, other])


def test_a_route_may_read_another_routes_answers() -> None:
    from streamer.config import Settings

    Settings(routes=[{"name": "a", "input": "in", "task": "answer", "output": "answers"},
                     {"name": "b", "input": "answers", "task": "answer", "output": "answers-of-answers"}])
