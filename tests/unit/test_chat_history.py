"""A conversation's history and its prompts (`streamer.tasks.chat`): what makes prefix reuse hit, what a fold
keeps, and what a replay finds."""

from __future__ import annotations

from streamer.config import Route
from streamer.contracts import InputEvent, Params, Source
from streamer.engine.requests import GenRequest
from streamer.tasks.chat import (
    CHAT_SYSTEM,
    KEPT_ANSWERS,
    History,
    Turn,
    asked_of,
    chat_messages,
    decode,
    encode,
    reply_request,
    session_of,
    summary_messages,
    summary_request,
)

ROUTE = Route(name="talk", input="i", output="o", task="chat", max_new_tokens=16, max_history_tokens=100)


def at(offset: int, partition: int = 0) -> Source:
    return Source(topic="i", partition=partition, offset=offset)


def turn(n: int, tokens: int = 10) -> Turn:
    return Turn(f"t{n}", f"question {n}", f" reply {n}\n", tokens)


def history_of(*turns: Turn) -> History:
    history = History()
    for n, said in enumerate(turns):
        history = history.append(said, f'{{"id": "{said.id}"}}', at(n))
    return history


def test_the_next_turns_prompt_begins_with_the_last_turns_prompt_and_its_reply_as_generated() -> None:
    """What an engine keeping the session's KV blocks needs: only the new message is new."""
    history = history_of(turn(0))
    before = chat_messages(history, "question 1", None)
    after = chat_messages(history.append(turn(1), "{}", at(1)), "question 2", None)
    assert after[:len(before)] == before
    assert after[len(before)] == {"role": "assistant", "content": " reply 1\n"}, "unstripped, byte for byte"
    assert before[0] == {"role": "system", "content": CHAT_SYSTEM}


def test_a_summary_goes_into_the_system_turn_after_the_routes_own_prompt() -> None:
    folded = history_of(turn(0), turn(1)).fold(1, "they met", 3)
    system = chat_messages(folded, "hi", "Be brief.")[0]["content"]
    assert system.startswith("Be brief.") and system.endswith("they met")
    assert [m["content"] for m in chat_messages(folded, "hi", None)[1:]] == ["question 1", " reply 1\n", "hi"]


def test_a_history_within_its_budget_is_not_folded() -> None:
    assert history_of(*(turn(n) for n in range(10))).overflow(budget=100, summary_room=16) == 0
    assert History().overflow(budget=16, summary_room=16) == 0


def test_an_overflowing_history_folds_its_oldest_turns_down_to_half_its_budget() -> None:
    """Half, not just under: folding to just under would fold (and break the prefix) at nearly every turn."""
    history = history_of(*(turn(n) for n in range(11)))  # 110 tokens
    n = history.overflow(budget=100, summary_room=16)
    assert n == 8, "16 for the summary + 3 turns left (30) <= 50; 2 turns more would not fit"
    folded = history.fold(n, "summary", 5)
    assert [t.id for t in folded.turns] == ["t8", "t9", "t10"] and folded.tokens == 35
    assert folded.overflow(budget=100, summary_room=16) == 0


def test_a_history_that_cannot_get_under_half_folds_every_turn() -> None:
    history = history_of(turn(0, tokens=200))
    assert history.overflow(budget=100, summary_room=16) == 1


def test_a_fold_summarises_the_old_summary_and_the_folded_turns_only() -> None:
    history = history_of(turn(0), turn(1), turn(2)).fold(1, "they met", 3)
    user = summary_messages(history, 1)[1]["content"]
    assert "Summary so far: they met" in user and "question 1" in user and "reply 1" in user
    assert "question 2" not in user


def test_a_turn_in_the_history_is_found_with_its_answer_and_a_turn_it_moved_past_is_behind() -> None:
    history = history_of(turn(0), turn(1))
    assert history.answer_of("t1") == '{"id": "t1"}'
    assert history.answer_of("t2") is None
    assert history.behind(at(0)) and history.behind(at(1)), "a turn at or before the last appended offset"
    assert not history.behind(at(2)) and not history.behind(at(0, partition=1)), "marks are per partition"


def test_answers_are_kept_for_the_latest_turns_folded_or_not() -> None:
    history = history_of(*(turn(n) for n in range(KEPT_ANSWERS + 5)))
    assert history.answer_of("t4") is None and history.answer_of("t5") is not None
    assert history.fold(60, "s", 1).answer_of("t6") is not None, "a folded turn's answer is still found"


def test_a_turn_that_reuses_a_kept_turns_id_but_asks_something_else_is_not_that_turn() -> None:
    first = InputEvent(id="m", key="c", text="what is two and two")
    other = InputEvent(id="m", key="c", text="and three and three")
    history = History().append(Turn("m", first.text, " four", 3), '{"id": "m"}', at(0), asked_of(first))
    assert history.answer_of("m", asked_of(first)) == '{"id": "m"}', "a replay of the turn"
    assert history.answer_of("m", asked_of(first.model_copy(update={"meta": {"x": 1}}))) is None
    assert history.answer_of("m", asked_of(other)) is None, "another turn with the id"
    assert decode(encode(history)).answer_of("m", asked_of(other)) is None
    older = decode(encode(history).replace(b',"asked":{"m":', b',"unknown":{"m":'))
    assert older.answer_of("m", asked_of(other)) == '{"id": "m"}', "a history kept without digests: by id"


def test_a_history_survives_its_round_trip_through_redis() -> None:
    history = history_of(turn(0), Turn("t1", "ünïcode \"quoted\"", "", 2)).fold(1, "s", 1)
    assert decode(encode(history)) == history
    assert decode(None) == History()


def test_a_turns_request_runs_in_its_conversations_session_under_the_routes_budget() -> None:
    event = InputEvent(id="e", text="hi", key="user-7", task="chat", params=Params(max_new_tokens=500))
    request = reply_request(event, ROUTE, 32, History())
    assert request == GenRequest(chat_messages(History(), "hi", None), max_new_tokens=32,
                                 session=session_of("talk", "user-7"))
    assert session_of("a:b", "c") != session_of("a", "b:c"), "no two conversations share a session"
    summary = summary_request(history_of(turn(0)), 1, ROUTE, 512)
    assert summary.max_new_tokens == 16 and summary.session is None
