"""Label scoring on tiny random models with the character tokenizer of tests/tiny.py.

Two architectures: Llama (rotary positions, blind to a constant position shift) and GPT-2 (learned
absolute positions), so wrong position ids under left padding change the scores. Weights are drawn
wide (initializer_range 0.5) so that scores depend on the input; at the default 0.02 every label
scores about -log(vocab) per token whatever the prompt, and a padding bug would go unseen.
"""

import asyncio
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path
from typing import Any

import pytest
import torch

from streamer.batching.batcher import BatchRules
from streamer.engine.pool import StaticPool
from streamer.engine.requests import GenRequest, GenResult, ScoreRequest, ScoreResult, label_score
from streamer.engine.worker import LLMWorker
from streamer.models.loader import LoadedModel, load_model
from tests.tiny import tiny_tokenizer
from tests.unit.test_worker_tiny import MARKER

LABELS = ("yes", "no", "not sure")  # 3, 2 and 8 tokens with the character tokenizer
TEXTS = ["Hi", "Is the sky blue today?", "Tell me a long story about a dragon and a knight.", "ok"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    common: dict[str, Any] = {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "initializer_range": 0.5,
    }
    torch.manual_seed(0)
    if request.param == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **common)
        model = LlamaForCausalLM(config)
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common))
    directory: Path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return load_model(directory, device="cpu")


@pytest.fixture
def worker(loaded: LoadedModel) -> LLMWorker:
    return LLMWorker(loaded)


def _score(text: str, labels: tuple[str, ...] = LABELS) -> ScoreRequest:
    return ScoreRequest(({"role": "user", "content": text},), labels)


def _gen(text: str, max_new: int = 4, **kw: Any) -> GenRequest:
    return GenRequest(({"role": "user", "content": text},), max_new_tokens=max_new, **kw)


def _reference(worker: LLMWorker, request: ScoreRequest) -> dict[str, float]:
    """Each (prompt, label) alone, unpadded, with the model's own positions: what scoring must equal."""
    tok = worker.tokenizer
    prompt = tok.apply_chat_template(list(request.messages), add_generation_prompt=True, return_dict=True)
    prompt_ids = list(prompt["input_ids"])
    scores = {}
    for label in request.labels:
        label_ids = tok(label, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = worker.model(input_ids=torch.tensor([prompt_ids + label_ids])).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        start = len(prompt_ids) - 1  # the position predicting the first label token
        tokens = [logprobs[start + j, t].item() for j, t in enumerate(label_ids)]
        end = torch.logsumexp(logprobs[-1, sorted(worker.eos_ids)], dim=-1).item()
        scores[label] = label_score([*tokens, end])
    return scores


def test_scores_aligned_with_labels(worker: LLMWorker) -> None:
    requests = [_score(TEXTS[0]), _score(TEXTS[1], ("b", "a")), _score(TEXTS[2], ("only",))]
    results = worker.score(requests)
    assert [list(r.scores) for r in results] == [list(q.labels) for q in requests]
    assert [r.tokens_in for r in results] == [worker.prompt_tokens(q.messages) for q in requests]
    for result in results:
        assert result.error is None
        assert result.label == max(result.scores, key=result.scores.__getitem__)
        assert all(math.isfinite(s) and s < 0 for s in result.scores.values())
    assert results[2].label == "only"


def test_batched_scores_equal_single_and_unpadded_reference(worker: LLMWorker) -> None:
    """Prompts and labels of different lengths: left padding, mask and positions must not matter."""
    requests = [_score(t) for t in TEXTS] + [_score(TEXTS[1], ("maybe", "x"))]
    batched = worker.score(requests)
    singles = [worker.score([r])[0] for r in requests]
    for b, s, request in zip(batched, singles, requests, strict=True):
        assert b.label == s.label and b.tokens_in == s.tokens_in
        assert b.scores == pytest.approx(s.scores, abs=1e-4)
        assert b.scores == pytest.approx(_reference(worker, request), abs=1e-4)


def test_score_is_total_log_prob_with_the_end_of_answer() -> None:
    assert label_score([-1.0, -2.0, -0.5]) == -3.5


def test_tie_goes_to_the_first_label(worker: LLMWorker) -> None:
    result = worker.score_result(_score("x", ("a", "b")), 5, [-1.0, -1.0])
    assert result == ScoreResult("a", {"a": -1.0, "b": -1.0}, 5)


def test_scoring_is_deterministic(worker: LLMWorker) -> None:
    requests = [_score(t) for t in TEXTS]
    assert worker.score(requests) == worker.score(requests)


def _poison_forward(worker: LLMWorker, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record each forward pass's batch size; raise for batches holding the marker."""
    sizes: list[int] = []
    real = worker.model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        rows = worker.tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=True)
        sizes.append(len(rows))
        if any(MARKER in row for row in rows):
            raise RuntimeError("poisoned batch")
        return real(*args, **kwargs)

    monkeypatch.setattr(worker.model, "forward", forward)
    return sizes


def test_failing_request_is_isolated(worker: LLMWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["a", "bb", f"{MARKER} here", "dddd", "eeeee"]
    clean = worker.score([_score(t) for t in texts if MARKER not in t])
    sizes = _poison_forward(worker, monkeypatch)
    results = worker.score([_score(t) for t in texts])
    assert [r.error is not None for r in results] == [False, False, True, False, False]
    tokens_in = worker.prompt_tokens(_score(texts[2]).messages)
    assert results[2] == ScoreResult("", {}, tokens_in, results[2].error)
    assert "poisoned batch" in (results[2].error or "")
    ok = [r for r in results if r.error is None]
    assert [r.label for r in ok] == [r.label for r in clean]
    assert all(a.scores == pytest.approx(b.scores, abs=1e-4) for a, b in zip(ok, clean, strict=True))
    assert sizes[0] == 5 * len(LABELS) and len(sizes) > 2  # one pass for every pair, then split


def test_mixed_run_keeps_alignment(worker: LLMWorker) -> None:
    requests: list[GenRequest | ScoreRequest] = [
        _gen(TEXTS[0]),
        _score(TEXTS[1]),
        _gen(TEXTS[2], max_new=2),
        _score(TEXTS[3], ("no", "yes")),
        _gen(TEXTS[3], temperature=0.7),
    ]
    results = worker.run(requests)
    kinds = [type(r) for r in results]
    assert kinds == [GenResult, ScoreResult, GenResult, ScoreResult, GenResult]
    assert results[:4:2] == worker.generate([requests[0], requests[2]])  # type: ignore[list-item]
    scored = worker.score([requests[1], requests[3]])  # type: ignore[list-item]
    assert [r.label for r in results[1::2][:2]] == [r.label for r in scored]
    assert worker.run([]) == [] and worker.score([]) == []


def test_prompt_tokens_budget_counts_each_label_row(worker: LLMWorker) -> None:
    request = _score(TEXTS[1])
    prompt = worker.prompt_tokens(request.messages)
    assert worker.prompt_tokens(request) == prompt * len(LABELS)
    assert worker.prompt_tokens(_gen(TEXTS[1])) == prompt


async def test_pool_runs_mixed_batches(worker: LLMWorker) -> None:
    async with StaticPool(worker, BatchRules(max_batch=4, max_wait_ms=50)) as pool:
        futures = [pool.submit(_gen(TEXTS[0])), pool.submit(_score(TEXTS[1]))]
        gen, scored = await asyncio.gather(*futures)
    assert isinstance(gen.result, GenResult) and isinstance(scored.result, ScoreResult)
    assert scored.result.label in LABELS and gen.batch_size == scored.batch_size == 2


@pytest.mark.parametrize("labels", [(), ("yes", "yes"), ("yes", " ")])
def test_score_request_validation(labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        _score("x", labels)
