"""A conversation's history and the prompts made from it, as pure values (`task: chat`).

The history is what Redis keeps per (route, conversation key): the running summary of the turns folded
away, the turns since (the user's text and the reply exactly as generated), the answer records of the
latest turns (so a replayed turn is answered with the bytes first written), and per input partition the
offset of the last turn appended from it (so a replay of a turn the history has moved past, dead-lettered
or folded, is never appended out of order).

Prompts are built so that the prompt of turn n+1 begins with exactly turn n's prompt followed by its
reply: the system turn is fixed (the route's prompt, plus the summary once there is one), earlier turns are
never rewritten, and replies are kept unstripped. Only a fold changes the prefix, so an engine that keeps a
conversation's KV blocks (`GenRequest.session`) prefills only the new message between folds. Folds shrink
the history to half its budget, so they are rare.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import orjson

from streamer.contracts import InputEvent, Source
from streamer.engine.requests import GenRequest
from streamer.tasks.prompts import Messages

if TYPE_CHECKING:  # config validates routes through the task registry, which is beside this module
    from streamer.config import Route

CHAT_SYSTEM = "You are a helpful assistant. Answer the user concisely and accurately."
SUMMARY_SYSTEM = ("You summarise conversations. Reply with a short summary of what the user and the assistant "
                  "said, keeping names, numbers and decisions.")
KEPT_ANSWERS = 64
"""Answer records kept per conversation (folded turns' included): a replay of one of these latest turns is
answered with its first bytes; an older one (behind the partition mark) is a dead letter, never a repeat."""


@dataclass(frozen=True)
class Turn:
    """One answered turn: the user's text and the reply as the model generated it (unstripped, as the next
    prompt must repeat it byte for byte), with their token count."""

    id: str
    user: str
    reply: str
    tokens: int


@dataclass(frozen=True)
class History:
    """One conversation, as stored (`encode`/`decode`)."""

    summary: str = ""
    summary_tokens: int = 0
    turns: tuple[Turn, ...] = ()
    answers: tuple[tuple[str, str], ...] = ()
    """(event id, answer record JSON) of the latest `KEPT_ANSWERS` turns, oldest first."""
    marks: Mapping[str, int] = field(default_factory=dict)
    """"topic:partition" -> offset of the last turn appended from that partition."""
    asked: Mapping[str, str] = field(default_factory=dict)
    """Event id -> `asked_of` the turn, for the ids of `answers`: a later turn that reuses an id but asks something
    else is not the turn kept (as the answer-reuse cache checks its digest, `streamer.pipeline.reuse`)."""

    @property
    def tokens(self) -> int:
        return self.summary_tokens + sum(turn.tokens for turn in self.turns)

    def answer_of(self, event_id: str, asked: str | None = None) -> str | None:
        """The answer record the turn with this id got, if it is one of the latest turns (and, given `asked`,
        the turn asked that: another turn with a recycled id is a turn of its own)."""
        if asked is not None and self.asked.get(event_id, asked) != asked:
            return None
        return next((answer for kept, answer in reversed(self.answers) if kept == event_id), None)

    def behind(self, source: Source) -> bool:
        """Whether the history already moved past this record: a turn after it on its partition was appended."""
        mark = self.marks.get(_partition(source))
        return mark is not None and source.offset <= mark

    def append(self, turn: Turn, answer: str, source: Source, asked: str | None = None) -> History:
        answers = (*self.answers, (turn.id, answer))[-KEPT_ANSWERS:]
        kept = {event_id for event_id, _ in answers}
        digests = {**self.asked, **({turn.id: asked} if asked is not None else {})}
        return replace(self, turns=(*self.turns, turn), answers=answers,
                       marks={**self.marks, _partition(source): source.offset},
                       asked={event_id: d for event_id, d in digests.items() if event_id in kept})

    def overflow(self, budget: int, summary_room: int) -> int:
        """How many of the oldest turns to fold before the next turn: none while the history fits `budget`
        tokens; else the fewest that bring it, with a new summary of up to `summary_room` tokens, to half the
        budget (folding to just under it would fold, and break the prefix, at nearly every turn)."""
        if self.tokens <= budget or not self.turns:
            return 0
        left = sum(turn.tokens for turn in self.turns)
        for n, turn in enumerate(self.turns, start=1):
            left -= turn.tokens
            if summary_room + left <= budget // 2:
                return n
        return len(self.turns)

    def fold(self, n: int, summary: str, summary_tokens: int) -> History:
        """The oldest `n` turns replaced by `summary` (which covers the old summary too)."""
        return replace(self, summary=summary, summary_tokens=summary_tokens, turns=self.turns[n:])


def chat_messages(history: History, text: str, system_prompt: str | None) -> Messages:
    """The turn's prompt: the fixed system turn (with the summary once there is one), every turn kept, the new text."""
    system = system_prompt or CHAT_SYSTEM
    if history.summary:
        system = f"{system}\n\nSummary of the conversation so far:\n{history.summary}"
    said = (({"role": "user", "content": t.user}, {"role": "assistant", "content": t.reply}) for t in history.turns)
    return ({"role": "system", "content": system}, *(m for pair in said for m in pair),
            {"role": "user", "content": text})


def summary_messages(history: History, n: int) -> Messages:
    """The fold's request: the old summary and the `n` oldest turns, as data to summarise."""
    lines = [f"Summary so far: {history.summary}"] if history.summary else []
    for turn in history.turns[:n]:
        lines += [f"User: {turn.user}", f"Assistant: {turn.reply.strip()}"]
    return ({"role": "system", "content": SUMMARY_SYSTEM},
            {"role": "user", "content": "Summarise this conversation:\n" + "\n".join(lines)})


def reply_request(event: InputEvent, route: Route, cap: int, history: History) -> GenRequest:
    """The turn's request: its prompt under the event's params, else the route's, in the conversation's session."""
    assert event.key is not None  # a keyless chat event is a dead letter before it gets here
    return GenRequest(chat_messages(history, event.text, route.system_prompt),
                      max_new_tokens=min(event.params.max_new_tokens or route.max_new_tokens, cap),
                      temperature=event.params.temperature or 0.0, session=session_of(route.name, event.key))


def summary_request(history: History, n: int, route: Route, cap: int) -> GenRequest:
    """The fold's request: greedy, up to `summary_cap` tokens, in no session (it is asked once)."""
    return GenRequest(summary_messages(history, n), max_new_tokens=summary_cap(route, cap))


def summary_cap(route: Route, cap: int) -> int:
    """A summary's token budget: the route's replies'."""
    return min(route.max_new_tokens, cap)


def session_of(route: str, key: str) -> str:
    """The conversation's stable id for the engine (`GenRequest.session`): one per (route, key), unambiguous."""
    return orjson.dumps([route, key]).decode()


def asked_of(event: InputEvent) -> str:
    """What a turn asked, as a digest (its text, meta and params): `History.answer_of` tells a replay of the turn
    from another turn that reuses its id."""
    shaped = orjson.dumps([event.text, event.meta, event.params.model_dump(mode="json")])
    return hashlib.sha256(shaped).hexdigest()


def encode(history: History) -> bytes:
    return orjson.dumps({"summary": history.summary, "summary_tokens": history.summary_tokens,
                         "turns": [[t.id, t.user, t.reply, t.tokens] for t in history.turns],
                         "answers": history.answers, "marks": history.marks, "asked": history.asked})


def decode(doc: bytes | None) -> History:
    """A stored history; none stored is the empty one."""
    if doc is None:
        return History()
    raw = orjson.loads(doc)
    return History(raw["summary"], raw["summary_tokens"], tuple(Turn(*t) for t in raw["turns"]),
                   tuple((i, a) for i, a in raw["answers"]), dict(raw["marks"]), dict(raw.get("asked", {})))


def _partition(source: Source) -> str:
    return f"{source.topic}:{source.partition}"
