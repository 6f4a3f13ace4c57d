"""Turns an event and its route into chat messages for the model, and the model's text into an output.

User text is inserted by plain substitution of the single `{text}` placeholder, never by a template
engine, so nothing a user writes can be interpreted as template syntax.
"""

from __future__ import annotations

from collections.abc import Sequence

from streamer.config import Route
from streamer.contracts import InputEvent

Messages = tuple[dict[str, str], ...]

ANSWER_SYSTEM = "You are a helpful assistant. Answer the question concisely and accurately."
# Measured on SmolLM2-135M label scoring (tests/integration/test_classify.py): the label list in the system
# turn and the bare text as the user turn; the old "Labels: ...\nText: ...\nLabel:" user turn always scored
# the first label.
CLASSIFY_SYSTEM = "Classify the sentiment/category of the text."
TRANSLATE_SYSTEM = "You are a translator. Reply with the translation only."


def render(template: str, text: str) -> str:
    """Replace the `{text}` placeholder with user text; braces or `%` in the text stay literal."""
    head, sep, tail = template.partition("{text}")
    return head + text + tail if sep else template


def build_messages(event: InputEvent, route: Route) -> Messages:
    """The chat for one event under its task (decode has already resolved `event.task`)."""
    task = event.task or route.task
    if task == "classify":
        return classify_messages(event.text, route.labels, route.system_prompt)
    if task == "translate":
        lang = event.params.target_lang or route.target_lang
        return _chat(route.system_prompt or TRANSLATE_SYSTEM, f"Translate into {lang}:\n{event.text}")
    if task == "prompt" and route.template is not None:
        return _chat(route.system_prompt, render(route.template, event.text))
    return _chat(route.system_prompt or ANSWER_SYSTEM, event.text)


def classify_messages(text: str, labels: Sequence[str], system_prompt: str | None = None) -> Messages:
    """The text alone as the user turn, so the answer (scored or generated) starts with a label.

    The label list is always appended to the system turn, a route's own prompt included: both
    scoring and `finish` need the model to know the labels.
    """
    system = f"{system_prompt or CLASSIFY_SYSTEM} Answer with one label: {', '.join(labels)}."
    return _chat(system, text)


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
    if route.task == "none":
        return frozenset({"none"})  # window-only: there is no answer topic for per-event tasks
    tasks = {"answer", "translate", route.task}
    if route.labels:
        tasks.add("classify")
    if route.template:
        tasks.add("prompt")
    return frozenset(tasks)


SUMMARIZE_SYSTEM = "You summarise streams of short messages. Reply with a two or three sentence summary."


def summarize_messages(texts: list[str], system_prompt: str | None = None) -> Messages:
    """A chronological list of texts to summarise; texts are data, each on its own bullet line."""
    body = "\n".join(f"- {' '.join(text.split())}" for text in texts)
    return _chat(system_prompt or SUMMARIZE_SYSTEM, f"Summarise these messages:\n{body}")
