"""Prompts: user text is data, never template syntax; classify snaps to a label."""

from hypothesis import given
from hypothesis import strategies as st

from streamer.config import Route
from streamer.contracts import InputEvent
from streamer.tasks.prompts import build_messages, finish, render, route_tasks

PROMPT_ROUTE = Route(name="p", input="i", output="o", task="prompt", template="Summarise: {text} (short)")
CLASSIFY_ROUTE = Route(name="c", input="i", output="o", task="classify", labels=["positive", "negative"])


@given(st.text())
def test_user_text_with_braces_and_percent_signs_stays_literal(text):
    assert render("Q: {text}!", text) == f"Q: {text}!"


def test_a_prompt_route_renders_its_template():
    event = InputEvent(id="1", text="{other} %s {text}", task="prompt")
    messages = build_messages(event, PROMPT_ROUTE)
    assert messages[-1] == {"role": "user", "content": "Summarise: {other} %s {text} (short)"}


def test_translate_uses_the_event_language_over_the_route_default():
    event = InputEvent(id="1", text="hello", task="translate", params={"target_lang": "German"})
    route = Route(name="t", input="i", output="o", task="translate")
    assert "German" in build_messages(event, route)[-1]["content"]


def test_classify_snaps_model_text_to_the_first_label_it_names():
    assert finish("classify", " Negative, clearly.", CLASSIFY_ROUTE) == "negative"
    assert finish("classify", "unsure", CLASSIFY_ROUTE) == "unsure"


def test_a_route_offers_only_tasks_whose_needs_it_meets():
    plain = Route(name="a", input="i", output="o")
    assert route_tasks(plain) == {"answer", "translate"}
    assert "classify" in route_tasks(CLASSIFY_ROUTE)
    assert "prompt" in route_tasks(PROMPT_ROUTE)
