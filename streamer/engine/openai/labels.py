"""How a label is read from a chat completion: from the first answer token's log-probabilities, or from an
answer constrained to the labels. Either way the label is one of the request's labels."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from streamer.tasks.prompts import snap_to_label

TOP_LOGPROBS = 20  # the most OpenAI and vLLM (by default) return
UNRANKED = -30.0  # the log-prob given to a label the constrained answer did not pick (e^-30: about 1e-13)


def top_logprobs(completion: Mapping[str, Any]) -> list[tuple[str, float]] | None:
    """The first answer token's alternatives as (token, log-prob); None when the server returned none."""
    try:
        first = completion["choices"][0]["logprobs"]["content"][0]
        return [(str(top["token"]), float(top["logprob"])) for top in first["top_logprobs"]]
    except (KeyError, IndexError, TypeError):
        return None


def scores_by_first_token(top: Sequence[tuple[str, float]], labels: Sequence[str]) -> dict[str, float] | None:
    """Each label's score: the log-prob of the likeliest top token that begins it (case and spacing ignored),
    or the lowest top log-prob (an upper bound) for a label none begins. None when the first token cannot
    decide: no label begun, or the best score shared by labels that begin alike ("pos" for positive, postal)."""
    begun: dict[str, float] = {}
    for label in labels:
        wanted = label.strip().lower()
        found = [lp for token, lp in top if (piece := token.strip().lower()) and wanted.startswith(piece)]
        if found:
            begun[label] = max(found)
    if not begun:
        return None
    best = max(begun.values())
    if sum(score == best for score in begun.values()) > 1:
        return None
    floor = min(lp for _, lp in top)
    return {label: begun.get(label, floor) for label in labels}


def choice_format(labels: Sequence[str]) -> dict[str, Any]:
    """A response_format that lets the server answer only a JSON string among the labels (llama.cpp, vLLM,
    SGLang and OpenAI accept json_schema)."""
    return {"type": "json_schema",
            "json_schema": {"name": "label", "strict": True, "schema": {"type": "string", "enum": list(labels)}}}


def chosen_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a constrained answer names (a JSON string). A server that ignored the format answers in words
    ("Positive."): the label those name first, as a resident model's classify answer is read; None when they
    name none."""
    try:
        answer = json.loads(text)
    except (ValueError, RecursionError):
        answer = text
    if not isinstance(answer, str):
        answer = text
    by_name = {label.strip().lower(): label for label in labels}
    exact = by_name.get(answer.strip().strip('"').lower())
    if exact is not None:
        return exact
    snapped = snap_to_label(answer, labels)
    return snapped if snapped in labels else None
