"""Classification by label log-likelihood on the real default model, with the service's classify prompt."""

import pytest

pytestmark = pytest.mark.integration

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from streamer.config import Route  # noqa: E402
from streamer.contracts import InputEvent  # noqa: E402
from streamer.engine.requests import ScoreRequest, ScoreResult  # noqa: E402
from streamer.engine.worker import LLMWorker  # noqa: E402
from streamer.tasks.event import TASKS  # noqa: E402

LABELS = ("positive", "negative", "neutral")
ROUTE = Route(name="reviews", input="i", output="o", task="classify", labels=list(LABELS))
REVIEWS = [json.loads(line) for line in (Path(__file__).parent / "data" / "reviews.jsonl").read_text().splitlines()]
BATCH = 16  # the pool's default max_batch


def _requests() -> list[ScoreRequest]:
    events = [InputEvent(id=str(i), text=r["text"], task="classify") for i, r in enumerate(REVIEWS)]
    classify = TASKS["classify"].request
    assert classify is not None
    requests = [classify(event, ROUTE, 1) for event in events]
    assert all(isinstance(r, ScoreRequest) for r in requests)
    return requests


def _score_all(worker: LLMWorker) -> list[ScoreResult]:
    requests = _requests()
    return [result for i in range(0, len(requests), BATCH) for result in worker.score(requests[i : i + BATCH])]


def test_review_sentiment_accuracy(worker: LLMWorker) -> None:
    assert len(REVIEWS) >= 20 and {r["label"] for r in REVIEWS} <= set(LABELS)
    results = _score_all(worker)
    assert all(r.error is None and r.label in LABELS for r in results)
    wrong = [(r["text"], res.label) for r, res in zip(REVIEWS, results, strict=True) if res.label != r["label"]]
    accuracy = 1 - len(wrong) / len(REVIEWS)
    print(f"\nclassify accuracy: {accuracy:.3f} ({len(REVIEWS) - len(wrong)}/{len(REVIEWS)}); wrong: {wrong}")
    assert accuracy >= 0.8


def test_scoring_is_deterministic(worker: LLMWorker) -> None:
    first, second = _score_all(worker), _score_all(worker)
    assert [r.label for r in first] == [r.label for r in second]
    for a, b in zip(first, second, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-5)  # exact on CPU; kernels may vary on GPU
