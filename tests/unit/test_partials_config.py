"""Which routes may stream their answers out, and where their delta records may go."""

import pytest
from pydantic import ValidationError

from streamer.config import Route, Settings


def route(**overrides) -> dict:
    return {"name": "q", "input": "questions", "output": "answers", **overrides}


def test_a_generating_route_may_stream_to_redis_alone_or_to_a_partial_topic_too() -> None:
    for task in ("answer", "translate"):
        assert Route(**route(task=task, stream=True)).stream
    prompt = Route(**route(task="prompt", template="Say {text}", stream=True, partial_output="answers.partial"))
    assert prompt.partial_output == "answers.partial"


@pytest.mark.parametrize("overrides", [
    {"task": "classify", "labels": ["yes", "no"], "stream": True},  # scored in one step: nothing to stream
    {"task": "none", "output": None, "stream": True,
     "window": {"kind": "tumbling", "size_ms": 1000, "output": "w"}},
])
def test_a_task_that_generates_no_text_cannot_stream(overrides) -> None:
    with pytest.raises(ValidationError, match="needs a task that generates text"):
        Route(**route(**overrides))


def test_a_partial_topic_needs_stream_true() -> None:
    with pytest.raises(ValidationError, match=r"partial_output` needs `stream: true"):
        Route(**route(partial_output="answers.partial"))


@pytest.mark.parametrize(("topic", "why"), [
    ("questions", "is an input topic"),
    ("other-in", "is an input topic"),
    ("streamer.dead-letters", "is the dead-letter topic"),
    ("answers", "is also where its results go"),
])
def test_a_partial_topic_is_none_of_the_inputs_the_dead_letters_or_the_results(topic, why) -> None:
    routes = [route(stream=True, partial_output=topic), {"name": "o", "input": "other-in", "output": "o"}]
    with pytest.raises(ValidationError, match=why):
        Settings(routes=routes)


def test_delta_records_are_not_offered_exactly_once_but_redis_progress_is() -> None:
    with pytest.raises(ValidationError, match=r"not offered with processing\.guarantee exactly_once"):
        Settings(processing={"guarantee": "exactly_once"}, routes=[route(stream=True, partial_output="p")])
    settings = Settings(processing={"guarantee": "exactly_once"}, routes=[route(stream=True)])
    assert settings.routes[0].stream
