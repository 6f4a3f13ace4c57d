"""The task registry is the one place a task is defined: what it needs of its route (checked when the
config loads), the model request it makes for an event, how its answer reads, and what a window keeps.
The stages look tasks up, so a new task is one registry entry."""

import ast
import re
from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from streamer.config import Route, WindowSettings
from streamer.contracts import InputEvent
from streamer.engine.requests import GenRequest, GenResult, Request, ScoreRequest, ScoreResult
from streamer.tasks.event import TASKS, Task, TaskName, route_tasks, task_of
from streamer.tasks.prompts import ANSWER_SYSTEM, TRANSLATE_SYSTEM, answer_messages, classify_messages
from streamer.tasks.window import WINDOW_TASKS, WindowTaskName

PIPELINE = Path(__file__).parents[2] / "streamer" / "pipeline"
LABELS = ["positive", "negative"]
WINDOW = WindowSettings(size_ms=1000, output="w")
CAP = 512


def route(**fields) -> Route:
    return Route(**{"name": "r", "input": "i", "output": "o", **fields})


def event(task: str, text: str = "hello", **params) -> InputEvent:
    return InputEvent(id="1", text=text, task=task, params=params)


def request(task: str, on: Route, text: str = "hello", cap: int = CAP, **params) -> Request:
    build = TASKS[task].request
    assert build is not None
    return build(event(task, text, **params), on, cap)


def test_the_config_accepts_exactly_the_registered_tasks() -> None:
    assert get_args(TaskName) == tuple(TASKS)
    assert get_args(WindowTaskName) == tuple(WINDOW_TASKS)
    assert Route.model_fields["task"].annotation == TaskName
    assert WindowSettings.model_fields["task"].annotation == WindowTaskName
    assert all(name == task.name for name, task in TASKS.items())
    assert all(name == task.name for name, task in WINDOW_TASKS.items())


@pytest.mark.parametrize(("fields", "problem"), [
    ({"task": "answer"}, None),
    ({"task": "answer", "output": None}, "a `answer` route needs an `output` topic"),
    ({"task": "translate", "output": None}, "a `translate` route needs an `output` topic"),
    ({"task": "classify", "labels": ["only"]}, "a `classify` route needs at least two `labels`"),
    ({"task": "classify", "labels": LABELS}, None),
    ({"task": "prompt"}, "a `prompt` route needs a `template` containing {text}"),
    ({"task": "prompt", "template": "no placeholder", "output": None},
     "a `prompt` route needs a `template` containing {text}"),
    ({"task": "prompt", "template": "Q: {text}", "output": None}, "a `prompt` route needs an `output` topic"),
    ({"task": "prompt", "template": "Q: {text}"}, None),
    ({"task": "chat", "output": None}, "a `chat` route needs an `output` topic"),
    ({"task": "chat"}, None),
    ({"task": "none", "output": None}, "a route with task `none` needs a `window`"),
    ({"task": "none", "output": None, "window": WINDOW}, None),
])
def test_every_task_checks_what_its_route_must_provide_when_the_config_loads(fields, problem) -> None:
    fields = {"name": "r", "input": "i", "output": "o", **fields}
    candidate = Route.model_construct(**fields)
    assert TASKS[candidate.task].problem(candidate) == problem
    if problem is None:
        Route(**fields)
    else:
        with pytest.raises(ValidationError, match=re.escape(problem)):
            Route(**fields)


def test_answer_asks_the_model_the_events_text_under_the_routes_token_budget() -> None:
    assert request("answer", route(max_new_tokens=64), "What is Kafka?") == GenRequest(
        ({"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": "What is Kafka?"}),
        max_new_tokens=64, temperature=0.0)


def test_an_events_own_params_win_over_the_routes_but_the_limit_caps_them() -> None:
    generated = request("answer", route(max_new_tokens=64), cap=100, max_new_tokens=1000, temperature=0.7)
    assert isinstance(generated, GenRequest)
    assert (generated.max_new_tokens, generated.temperature) == (100, 0.7)


def test_translate_uses_the_event_language_over_the_route_default() -> None:
    on = route(task="translate", target_lang="Spanish")
    assert request("translate", on).messages == (
        {"role": "system", "content": TRANSLATE_SYSTEM}, {"role": "user", "content": "Translate into Spanish:\nhello"})
    assert "German" in request("translate", on, target_lang="German").messages[-1]["content"]


def test_a_prompt_route_renders_its_template_with_the_text_as_data() -> None:
    on = route(task="prompt", template="Summarise: {text} (short)")
    assert request("prompt", on, "{other} %s {text}").messages == (
        {"role": "user", "content": "Summarise: {other} %s {text} (short)"},)


def test_classify_scores_the_routes_labels_instead_of_generating() -> None:
    on = route(task="classify", labels=LABELS, system_prompt="Rate reviews.")
    assert request("classify", on, "great film", cap=1) == ScoreRequest(
        classify_messages("great film", LABELS, "Rate reviews."), ("positive", "negative"))


def test_only_a_window_only_route_runs_no_model_per_event() -> None:
    assert {name for name, task in TASKS.items() if not task.calls_model} == {"none"}
    assert TASKS["none"].request is None


def test_classify_answers_with_a_label_and_other_tasks_with_stripped_text() -> None:
    on = route(task="classify", labels=LABELS)
    classify = TASKS["classify"]
    assert classify.answer(ScoreResult("negative", {"positive": -3.0, "negative": -0.1}, 9), on) == "negative"
    assert classify.answer(GenResult(" Negative, clearly.", 9, 3), on) == "negative"  # a backend that generates
    assert classify.answer(GenResult(" unsure ", 9, 2), on) == "unsure"
    assert {TASKS[name].answer(GenResult(" Paris. ", 9, 2), on) for name in ("answer", "translate", "prompt")} == {
        "Paris."}


def test_only_classify_answers_feed_a_windows_label_counts_among_text_tasks() -> None:
    on = route(labels=LABELS)
    assert {name for name, task in TASKS.items() if not task.structured and task.tally(on) is not None} == {
        "classify"}
    assert TASKS["classify"].tally(on)("positive") == "positive"  # type: ignore[misc]


def test_a_route_offers_only_tasks_whose_needs_it_meets() -> None:
    assert route_tasks(route()) == {"answer", "translate"}
    assert route_tasks(route(labels=LABELS)) == {"answer", "translate", "classify"}
    assert route_tasks(route(template="Q: {text}")) == {"answer", "translate", "prompt"}
    assert route_tasks(route(task="classify", labels=LABELS)) == {"answer", "translate", "classify"}
    assert route_tasks(route(task="prompt", template="Q: {text}")) == {"answer", "translate", "prompt"}


def test_a_window_only_route_offers_no_per_event_task_it_has_no_answer_topic_for() -> None:
    assert route_tasks(route(task="none", output=None, window=WINDOW, labels=LABELS)) == {"none"}


def test_an_event_runs_its_own_task_else_its_routes() -> None:
    on = route(labels=LABELS)
    assert task_of(event("classify"), on) is TASKS["classify"]
    assert task_of(InputEvent(id="1", text="hello"), on) is TASKS["answer"]


@pytest.mark.parametrize(("name", "stats", "summarizes", "counts_tokens"), [
    ("count", False, False, False),
    ("stats", True, False, True),
    ("summarize", False, True, True),
])
def test_each_window_task_keeps_only_what_its_result_needs(name, stats, summarizes, counts_tokens) -> None:
    task = WINDOW_TASKS[name]
    assert (task.stats, task.summarizes, task.counts_tokens) == (stats, summarizes, counts_tokens)


def test_a_new_task_is_one_entry_whose_defaults_fit_a_generating_task() -> None:
    shout = Task("shout", lambda event, on, cap: GenRequest(answer_messages(event.text.upper()), cap))
    assert shout.calls_model and shout.tally(route()) is None and not shout.structured
    assert shout.offered(route())
    assert shout.problem(Route.model_construct(name="r", input="i", output=None)) == (
        "a `shout` route needs an `output` topic")
    assert shout.answer(GenResult(" HI ", 3, 1), route()) == "HI"


@pytest.mark.parametrize("module", ["events.py", "window_stage.py"])
def test_the_stages_name_no_task_they_look_tasks_up(module: str) -> None:
    names = set(TASKS) | set(WINDOW_TASKS)
    tree = ast.parse((PIPELINE / module).read_text())
    named = [(node.lineno, node.value) for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and node.value in names]
    assert named == [], f"{module} compares task names; give the task a registry attribute instead"
