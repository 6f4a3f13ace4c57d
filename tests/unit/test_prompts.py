"""Prompts: user text is data, never template syntax; the model learns a classify route's labels."""

from hypothesis import given
from hypothesis import strategies as st

from streamer.tasks.prompts import classify_messages, render, snap_to_label, template_messages

LABELS = ["positive", "negative"]


@given(st.text())
def test_user_text_with_braces_and_percent_signs_stays_literal(text):
    assert render("Q: {text}!", text) == f"Q: {text}!"


def test_a_template_is_the_whole_chat_unless_the_route_adds_a_system_prompt():
    assert template_messages("Summarise: {text}", "x") == ({"role": "user", "content": "Summarise: x"},)
    assert template_messages("{text}", "x", "Be brief.")[0] == {"role": "system", "content": "Be brief."}


def test_classify_lists_the_labels_in_the_system_turn_even_under_a_routes_own_prompt():
    system, user = classify_messages("great film", LABELS, "Rate reviews.")
    assert system["content"] == "Rate reviews. Answer with one label: positive, negative."
    assert user == {"role": "user", "content": "great film"}


def test_classify_snaps_model_text_to_the_first_label_it_names():
    assert snap_to_label(" Negative, clearly.", LABELS) == "negative"
    assert snap_to_label("positive, not negative", LABELS) == "positive"
    assert snap_to_label(" unsure ", LABELS) == "unsure"
