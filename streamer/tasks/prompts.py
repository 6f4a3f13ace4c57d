"""Turns an event and its route into chat messages for the model, and the model's text into an output.

User text is inserted by plain substitution of the single `{text}` placeholder, never by a template
engine, so nothing a user writes can be interpreted as template syntax.
"""

from __future__ import annotations

from streamer.config import Route
from streamer.contracts import InputEvent

Messages = tuple[dict[str, str], ...]

ANSWER_SYSTEM = "You are a helpful assistant. Answer the question concisely and accurately."
CLASSIFY_SYSTEM = "You are a text classifier. Reply with exactly one label from the list and nothing else."
TRANSLATE_SYSTEM = "You are a translator. Reply with the translation only."


def render(template: str, text: str) -> str:
    """Replace the `{text}` placeholder with user text; braces or `%` in the text stay literal."""
    head, sep, tail = template.partition("{text}")
    return head + text + tail if sep else template


def build_messages(event: InputEvent, route: Route) -> Messages:
    """The chat for one event under its task (decode has already resolved `event.task`)."""
    task = event.task or route.task
    if task == "classify":
        labels = ", ".join(route.labels)
        user = f"Labels: {labels}\nText: {event.text}\nLabel:"
        return _chat(route.system_prompt or CLASSIFY_SYSTEM, user)
    if task == "translate":
        lang = event.params.target_lang or route.target_lang
        return _chat(route.system_prompt or TRANSLATE_SYSTEM, f"Translate into {lang}:\n{event.text}")
    if task == "prompt" and route.template is not None:
        return _chat(route.system_prompt, render(route.template, event.text))
    return _chat(route.system_prompt or ANSWER_SYSTEM, event.text)


def _chat(system: str | None, user: str) -> Messages:
    system_turn = ({"role": "system", "content": system},) if system else ()
    return (*system_turn, {"role": "user", "content": user})


def finish(task: str, text: str, route: Route) -> str:
    """Post-process model text: `classify` snaps to the closest label (first label named wins)."""
    if task != "classify":
        return text.strip()
    lowered = text.lower()
    hits = [(lowered.find(label.lower()), label) for label in route.labels if label.lower() in lowered]
    return min(hits)[1] if hits else text.strip()


def route_tasks(route: Route) -> frozenset[str]:
    """Tasks an event on this route may ask for: those whose needs (labels, template) the route meets."""
    tasks = {"answer", "translate", route.task}
    if route.labels:
        tasks.add("classify")
    if route.template:
        tasks.add("prompt")
    return frozenset(tasks)
