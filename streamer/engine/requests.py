"""What the pipeline asks of a model and what it gets back: chat completions, label scoring, and the
timing around them. Plain dataclasses without torch, so the stages that make requests (event handling,
windows, the API) do not load the model's libraries to speak to it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIN_SAMPLING_TEMPERATURE = 1e-4
"""Temperatures below this decode greedily: logits divided by less overflow float32 to inf, which no softmax can
sample (an event asking for temperature 1e-45 was dead-lettered `model_error`); at 1e-4 sampling is argmax anyway."""


def samples(temperature: float) -> bool:
    """Whether a request at this temperature samples (else it decodes greedily)."""
    return temperature >= MIN_SAMPLING_TEMPERATURE


@dataclass(frozen=True)
class GenRequest:
    """One chat completion; the worker applies the chat template."""

    messages: tuple[dict[str, str], ...]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    session: str | None = None
    """A conversation this request continues: an engine that can keeps the KV blocks of its prompt and answer
    for the session's next turn (pinned while the session is active, least recently used evicted first)."""
    schema: str | None = None
    """A JSON Schema (canonical JSON text, `streamer.tasks.schemas`) the answer must match: the native engine
    masks the tokens its grammar forbids at every step; a remote server gets it as `response_format`."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class GenResult:
    """The answer to one request.

    tokens_out counts the generated tokens kept in `text`: at most the request's max_new_tokens,
    ending before the first EOS; neither EOS nor padding is counted.
    """

    text: str
    tokens_in: int
    tokens_out: int
    error: str | None = None  # set when this request failed even alone
    error_code: str | None = None  # the error's dead-letter code (contracts.ErrorCode); None: model_error


@dataclass(frozen=True)
class ScoreRequest:
    """Pick one of `labels` as the assistant's answer to a chat, by the model's log-likelihood."""

    messages: tuple[dict[str, str], ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.labels or any(not label.strip() for label in self.labels):
            raise ValueError(f"labels must be non-empty strings, got {self.labels!r}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels!r}")


@dataclass(frozen=True)
class ScoreResult:
    """The best label and every label's score: log P(the answer is exactly that label), see `label_score`.

    tokens_in counts the templated prompt once, like GenResult, though it is run once per label.
    """

    label: str
    scores: dict[str, float]
    tokens_in: int
    error: str | None = None  # set when this request failed even alone
    error_code: str | None = None  # the error's dead-letter code (contracts.ErrorCode); None: model_error


Request = GenRequest | ScoreRequest
Result = GenResult | ScoreResult


def label_score(logprobs: Sequence[float]) -> float:
    """Total log-prob of the label's tokens plus the end of the answer right after them.

    The end term makes this the probability of answering exactly the label, so a label is not
    rewarded for being the prefix of a longer answer. On the review set it beat the mean (which
    inflates a label like "Neut|ral" whose later tokens are near-certain) and the first token.
    """
    return sum(logprobs)


@dataclass(frozen=True)
class Generated:
    """A worker result (generated text or label scores, as the request asked) plus where its time went."""

    result: GenResult | ScoreResult
    queued_ms: float
    model_ms: float
    batch_size: int
    first_token_ms: float | None = None  # from submit to the first generated token (continuous engine only)
