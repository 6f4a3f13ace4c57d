"""The chat messages each task sends the model, and the reading of a classify answer.

User text is inserted by plain substitution of the single `{text}` placeholder, never by a template
engine, so nothing a user writes can be interpreted as template syntax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Messages = tuple[dict[str, str], ...]

ANSWER_SYSTEM = "You are a helpful assistant. Answer the question concisely and accurately."
# Measured on SmolLM2-135M label scoring (tests/integration/test_classify.py): the label list in the system
# turn and the bare text as the user turn; the old "Labels: ...\nText: ...\nLabel:" user turn always scored
# the first label.
CLASSIFY_SYSTEM = "Classify the sentiment/category of the text."
TRANSLATE_SYSTEM = "You are a translator. Reply with the translation only."
# On tests/data/support_messages.jsonl this beat "Extract the fields of the user's message as one JSON object."
# by 7 points of product accuracy (0.65 vs 0.58) and was even on the rest (tests/integration/test_extract.py).
EXTRACT_SYSTEM = ("Read the user's message and fill in each field from what it says; use null for a value the message "
                  "does not give.")
SUMMARIZE_SYSTEM = "You summarise streams of short messages. Reply with a two or three sentence summary."


def render(template: str, text: str) -> str:
    """Replace the `{text}` placeholder with user text; braces or `%` in the text stay literal."""
    head, sep, tail = template.partition("{text}")
    return head + text + tail if sep else template


def answer_messages(text: str, system_prompt: str | None = None) -> Messages:
    return _chat(system_prompt or ANSWER_SYSTEM, text)


def translate_messages(text: str, lang: str, system_prompt: str | None = None) -> Messages:
    return _chat(system_prompt or TRANSLATE_SYSTEM, f"Translate into {lang}:\n{text}")


def template_messages(template: str, text: str, system_prompt: str | None = None) -> Messages:
    """The rendered template alone: a route's own template carries its instructions, so no default system turn."""
    return _chat(system_prompt, render(template, text))


def classify_messages(text: str, labels: Sequence[str], system_prompt: str | None = None) -> Messages:
    """The text alone as the user turn, so the answer (scored or generated) starts with a label.

    The label list is always appended to the system turn, a route's own prompt included: both
    scoring and `snap_to_label` need the model to know the labels.
    """
    system = f"{system_prompt or CLASSIFY_SYSTEM} Answer with one label: {', '.join(labels)}."
    return _chat(system, text)


def extract_messages(text: str, schema: Mapping[str, Any], system_prompt: str | None = None) -> Messages:
    """The text alone as the user turn; the system turn (the route's instruction, else a default) lists the
    schema's fields, so the model knows what each means before the grammar makes it write them."""
    fields = "; ".join(f"{name}: {_field_hint(spec)}" for name, spec in schema.get("properties", {}).items())
    return _chat(f"{system_prompt or EXTRACT_SYSTEM} Fields: {fields}." if fields else system_prompt or EXTRACT_SYSTEM,
                 text)


def _field_hint(spec: Mapping[str, Any]) -> str:
    """A property in words: its description, else its enum or type."""
    if isinstance(spec.get("description"), str):
        return str(spec["description"])
    if "enum" in spec:
        return "one of " + ", ".join(str(value) for value in spec["enum"])
    kind = spec.get("type", "any value")
    return " or ".join(kind) if isinstance(kind, list) else str(kind)


def snap_to_label(text: str, labels: Sequence[str]) -> str:
    """Generated classify text as the label it names first, or stripped when it names none."""
    lowered = text.lower()
    hits = [(lowered.find(label.lower()), label) for label in labels if label.lower() in lowered]
    return min(hits)[1] if hits else text.strip()


def summarize_messages(texts: list[str], system_prompt: str | None = None) -> Messages:
    """A chronological list of texts to summarise; texts are data, each on its own bullet line."""
    body = "\n".join(f"- {' '.join(text.split())}" for text in texts)
    return _chat(system_prompt or SUMMARIZE_SYSTEM, f"Summarise these messages:\n{body}")


def _chat(system: str | None, user: str) -> Messages:
    system_turn = ({"role": "system", "content": system},) if system else ()
    return (*system_turn, {"role": "user", "content": user})
