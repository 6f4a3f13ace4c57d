"""A label from the first token's log-probabilities, or from an answer constrained to the labels."""

from streamer.engine.openai.labels import choice_format, chosen_label, scores_by_first_token, top_logprobs

LABELS = ("positive", "negative", "neutral")


def test_each_label_scores_the_likeliest_token_that_begins_it() -> None:
    top = [("Positive", -0.2), ("This", -1.0), (" neg", -2.0), ("Neg", -2.5)]
    assert scores_by_first_token(top, LABELS) == {"positive": -0.2, "negative": -2.0, "neutral": -2.5}


def test_the_first_token_cannot_decide_between_labels_that_begin_alike() -> None:
    assert scores_by_first_token([("pos", -0.1), ("x", -3.0)], ("positive", "postal")) is None
    assert scores_by_first_token([("The", -0.1)], LABELS) is None


def test_top_logprobs_reads_the_openai_shape_and_none_without_it() -> None:
    completion = {"choices": [{"logprobs": {"content": [{"token": "Pos", "logprob": -0.1,
                                                          "top_logprobs": [{"token": "Pos", "logprob": -0.1}]}]}}]}
    assert top_logprobs(completion) == [("Pos", -0.1)]
    assert top_logprobs({"choices": [{"message": {"content": "x"}}]}) is None


def test_a_constrained_answer_names_a_label_or_none() -> None:
    assert choice_format(LABELS)["json_schema"]["schema"] == {"type": "string", "enum": list(LABELS)}
    assert chosen_label('"negative"', LABELS) == "negative"
    assert chosen_label("Neutral", LABELS) == "neutral"  # a server that ignored the format
    assert chosen_label('"maybe"', LABELS) is None and chosen_label("[1]", LABELS) is None
