"""Per-event tasks as values: what a task needs of its route, the model request it makes for an event,
how its answer is read. Config validation, decoding, event handling and windows look a task up here
instead of comparing its name, so a new task is one entry in `TASKS` (and its name in `TaskName`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from streamer.contracts import InputEvent
from streamer.engine.requests import GenRequest, Request, Result, ScoreRequest, ScoreResult
from streamer.tasks.prompts import (
    Messages,
    answer_messages,
    classify_messages,
    extract_messages,
    snap_to_label,
    template_messages,
    translate_messages,
)

if TYPE_CHECKING:  # config validates routes through this registry, so it imports it
    from streamer.config import Route

TaskName = Literal["answer", "classify", "translate", "prompt", "extract", "chat", "none"]
"""What `Route.task` accepts: the keys of `TASKS` (a test keeps the two equal)."""

RequestBuilder = Callable[[InputEvent, "Route", int], Request]
"""An event's model request under its route; the int caps max_new_tokens (`limits.max_new_tokens`)."""
Output = str | dict[str, Any]
"""An answer's `output`: text, or the object an `extract` answer's schema matches."""
Tally = Callable[[Output], str | None]
"""The value a window counts of one answer's output (a label, a field's value); None: nothing to count."""


def output_text(output: Any) -> str:
    """An output (or a value in one) as text: anything but a string as compact JSON."""
    return output if isinstance(output, str) else json.dumps(output, separators=(",", ":"), ensure_ascii=False)


def _no_tally(route: Route) -> Tally | None:
    return None


def _fine(route: Route) -> str | None:
    return None


def _text(result: Result, route: Route) -> str:
    """Generated text, stripped; a scored result is its label."""
    return result.label if isinstance(result, ScoreResult) else result.text.strip()


@dataclass(frozen=True)
class Task:
    """One kind of per-event work, named by a route's `task` or an event's own."""

    name: str
    request: RequestBuilder | None
    """None: the task calls no model and writes no answer (a window-only route)."""
    answer: Callable[[Result, Route], Output] = _text
    """The answer's `output` from the model's result; raises InvalidOutput for one its route cannot accept."""
    check: Callable[[Route], str | None] = _fine
    """Why a route cannot have this task as its own (checked at config load), or None."""
    offered: Callable[[Route], bool] = lambda route: True
    """Whether an event on an answering route of another task may ask for this one: the route has what it needs."""
    tally: Callable[[Route], Tally | None] = _no_tally
    """What a window of a route with this task counts of each answer (`LabelSlot`), or None: nothing."""
    structured: bool = False
    """Its answers are objects matching the route's `schema` (they name it; `count_field` may pick a field)."""
    generates: bool = False
    """It generates text token by token, which a `stream: true` route writes out as it comes."""
    converses: bool = False
    """A turn of the conversation its key names: its request is built from the conversation's history once the
    previous turn is answered (`streamer.pipeline.chat`), so `request` is None though it calls the model."""

    @property
    def calls_model(self) -> bool:
        return self.request is not None or self.converses

    def problem(self, route: Route) -> str | None:
        """Why `route` cannot run this task: its own needs first, then an output topic for its answers, then
        text to stream where the route streams."""
        if (own := self.check(route)) is not None:
            return own
        if route.count_field is not None and not self.structured:
            return f"`count_field` names a field of an answer object; `{self.name}` answers are text"
        if self.calls_model and route.output is None:
            return f"a `{self.name}` route needs an `output` topic"
        if route.stream and not self.generates:
            return f"`stream: true` needs a task that generates text; `{self.name}` does not"
        if route.partial_output is not None and not route.stream:
            return "`partial_output` needs `stream: true`"
        return None


def _generate(messages: Messages, event: InputEvent, route: Route, cap: int, schema: str | None = None) -> GenRequest:
    """A chat completion under the event's own params, else the route's."""
    return GenRequest(messages, max_new_tokens=min(event.params.max_new_tokens or route.max_new_tokens, cap),
                      temperature=event.params.temperature or 0.0, schema=schema)


def _answer(event: InputEvent, route: Route, cap: int) -> Request:
    return _generate(answer_messages(event.text, route.system_prompt), event, route, cap)


def _translate(event: InputEvent, route: Route, cap: int) -> Request:
    lang = event.params.target_lang or route.target_lang
    return _generate(translate_messages(event.text, lang, route.system_prompt), event, route, cap)


def _prompt(event: InputEvent, route: Route, cap: int) -> Request:
    assert route.template is not None  # checked (a `prompt` route) or offered (a route with a template)
    return _generate(template_messages(route.template, event.text, route.system_prompt), event, route, cap)


def _classify(event: InputEvent, route: Route, cap: int) -> Request:
    """Scored, not generated: one forward pass picks the likeliest label, so there is no token cap."""
    return ScoreRequest(classify_messages(event.text, route.labels, route.system_prompt), tuple(route.labels))


def _extract(event: InputEvent, route: Route, cap: int) -> Request:
    """Decoded under the route's schema: the engine (or the remote server) only lets the model write matches."""
    spec = route.schema_spec
    assert spec is not None  # checked (an `extract` route) or offered (a route with a schema)
    messages = extract_messages(event.text, spec.document, route.system_prompt)
    return _generate(messages, event, route, cap, spec.text)


def _extracted(result: Result, route: Route) -> Output:
    """The object, checked again: a remote server may ignore the schema, and a token cap cuts any object."""
    assert route.schema_spec is not None
    return route.schema_spec.parse(_text(result, route))


def _field_tally(route: Route) -> Tally | None:
    """The route's `count_field` of each extracted object, as text (null or absent: not counted)."""
    name = route.count_field
    if name is None:
        return None
    return lambda out: None if not isinstance(out, dict) or out.get(name) is None else output_text(out[name])


def _needs_schema(route: Route) -> str | None:
    spec = route.schema_spec
    if spec is None:
        return "an `extract` route needs a `schema`"
    if route.count_field is None:
        return None
    if route.window is None:
        return "`count_field` counts per window: the route needs a `window`"
    field = spec.document.get("properties", {}).get(route.count_field)
    if not isinstance(field, dict) or "enum" not in field:
        return f"`count_field` {route.count_field!r} must name a property of the schema with an `enum`"
    return None


def _label(result: Result, route: Route) -> str:
    """The scored label; generated text snaps to the label it names first."""
    return result.label if isinstance(result, ScoreResult) else snap_to_label(result.text, route.labels)


def _needs_template(route: Route) -> str | None:
    if route.template is None or "{text}" not in route.template:
        return "a `prompt` route needs a `template` containing {text}"
    return None


def _needs_labels(route: Route) -> str | None:
    return "a `classify` route needs at least two `labels`" if len(route.labels) < 2 else None


def _needs_window(route: Route) -> str | None:
    return "a route with task `none` needs a `window`" if route.window is None else None


TASKS: Mapping[str, Task] = MappingProxyType({task.name: task for task in (
    Task("answer", _answer, generates=True),
    Task("classify", _classify, answer=_label, check=_needs_labels, offered=lambda route: bool(route.labels),
         tally=lambda route: str),
    Task("translate", _translate, generates=True),
    Task("prompt", _prompt, check=_needs_template, offered=lambda route: bool(route.template), generates=True),
    Task("extract", _extract, answer=_extracted, check=_needs_schema,
         offered=lambda route: route.schema_spec is not None, tally=_field_tally, structured=True),
    Task("chat", None, offered=lambda route: False, generates=True, converses=True),
    Task("none", None, check=_needs_window, offered=lambda route: False),
)})


def route_tasks(route: Route) -> frozenset[str]:
    """Tasks an event on this route may ask for: the route's own, plus, where the route answers, those it offers."""
    own = TASKS[route.task]
    if not own.calls_model:
        return frozenset({own.name})  # window-only: there is no answer topic for per-event tasks
    return frozenset({own.name, *(task.name for task in TASKS.values() if task.offered(route))})


def task_of(event: InputEvent, route: Route) -> Task:
    """The task an event runs: its own (decoding checked it is one the route offers), else its route's."""
    return TASKS[event.task or route.task]
