"""The resident model worker: batched chat generation, synchronous (the async side runs it in a thread).

A batch that raises is split in halves and retried, so one bad request becomes one error
result (a dead letter upstream) instead of failing its whole batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from streamer.models.loader import LoadedModel

log = logging.getLogger(__name__)

WARM_UP_MESSAGES = ({"role": "user", "content": "Hi"},)


@dataclass(frozen=True)
class GenRequest:
    """One chat completion; the worker applies the chat template."""

    messages: tuple[dict[str, str], ...]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

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


class _RowLimits(StoppingCriteria):
    """Marks each row done at its own max_new_tokens, so the batch stops once every row is done."""

    def __init__(self, prompt_len: int, limits: torch.Tensor) -> None:
        self.prompt_len = prompt_len
        self.limits = limits

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prompt_len) >= self.limits


def trim_generated(tokens: Sequence[int], limit: int, eos_ids: frozenset[int], ignore_eos: bool) -> list[int]:
    """Cut a row's generated tokens at its own limit, then before its first EOS (dropping padding too)."""
    kept = list(tokens[:limit])
    if ignore_eos:
        return kept
    for i, token in enumerate(kept):
        if token in eos_ids:
            return kept[:i]
    return kept


class LLMWorker:
    """Owns the loaded model and turns batches of requests into aligned results."""

    def __init__(self, loaded: LoadedModel, *, threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name: str = loaded.name
        self.device = loaded.device
        self.eos_ids = _eos_ids(self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id)
        self.pad_id: int = self.tokenizer.pad_token_id
        # prompt_tokens runs on the event loop while generate runs in the worker thread, and a fast
        # tokenizer's padding/truncation settings are shared mutable state in the Rust backend.
        self._tokenizer_lock = threading.Lock()

    def prompt_tokens(self, messages: Sequence[Mapping[str, str]]) -> int:
        """Token count of the templated prompt, for the batcher's token budget."""
        return int(self._encode([messages])["attention_mask"].sum())

    def warm_up(self) -> None:
        """Run one tiny padded batch so kernels and allocator are ready before the first real batch."""
        short = GenRequest(WARM_UP_MESSAGES, max_new_tokens=2)
        longer = GenRequest(({"role": "user", "content": "Say hello to everyone."},), max_new_tokens=2)
        self.generate([short, longer])

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Results aligned with `requests`; requests are grouped by sampling settings."""
        by_index: dict[int, GenResult] = {}
        for indices in _group_by_sampling(requests).values():
            group = [requests[i] for i in indices]
            by_index.update(zip(indices, self._generate_isolating(group), strict=True))
        return [by_index[i] for i in range(len(requests))]

    def _generate_isolating(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Generate a batch; on failure split it in halves, down to single failed requests."""
        try:
            return self._generate_batch(requests)
        except Exception as exc:
            self._after_failure()
            if len(requests) == 1:
                log.warning("generation failed for a single request: %r", exc)
                return [GenResult("", self._safe_prompt_tokens(requests[0]), 0, error=_describe(exc))]
            log.info("batch of %d failed (%r); retrying in halves", len(requests), exc)
            half = len(requests) // 2
            return self._generate_isolating(requests[:half]) + self._generate_isolating(requests[half:])

    def _generate_batch(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """One `model.generate` call for requests sharing temperature and ignore_eos."""
        enc = self._encode([r.messages for r in requests])
        prompt_len = enc["input_ids"].shape[1]
        limits = [r.max_new_tokens for r in requests]
        kwargs = self._generation_kwargs(requests[0], max(limits))
        stop = _RowLimits(prompt_len, torch.tensor(limits, device=self.device))
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs, stopping_criteria=StoppingCriteriaList([stop]))
        generated = out[:, prompt_len:].tolist()
        tokens_in = enc["attention_mask"].sum(dim=1).tolist()
        return [
            self._result(row, n_in, r) for row, n_in, r in zip(generated, tokens_in, requests, strict=True)
        ]

    def _result(self, row: list[int], tokens_in: int, request: GenRequest) -> GenResult:
        kept = trim_generated(row, request.max_new_tokens, self.eos_ids, request.ignore_eos)
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return GenResult(text=text, tokens_in=int(tokens_in), tokens_out=len(kept))

    def _generation_kwargs(self, request: GenRequest, max_new_tokens: int) -> dict[str, Any]:
        """Greedy for temperature 0, sampling otherwise; EOS suppressed for ignore_eos."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": self.pad_id,
            "eos_token_id": sorted(self.eos_ids),
            "do_sample": request.temperature > 0,
        }
        if request.temperature > 0:
            kwargs["temperature"] = request.temperature
        if request.ignore_eos:
            kwargs["min_new_tokens"] = max_new_tokens
        return kwargs

    def _encode(self, conversations: Sequence[Sequence[Mapping[str, str]]]) -> dict[str, torch.Tensor]:
        """Templated, left-padded prompts; control tokens typed by users are encoded as plain text."""
        with self._tokenizer_lock:
            enc = self.tokenizer.apply_chat_template(
                [list(c) for c in conversations],
                add_generation_prompt=True,
                tokenize=True,
                sanitize_control_tokens=True,
                padding=True,
                return_dict=True,
                return_tensors="pt",
            )
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
        }

    def _safe_prompt_tokens(self, request: GenRequest) -> int:
        """Prompt size for an error result; 0 when the prompt itself cannot be built."""
        try:
            return self.prompt_tokens(request.messages)
        except Exception:
            return 0

    def _after_failure(self) -> None:
        """Release cached CUDA memory, since the likeliest batch failure is running out of it."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _group_by_sampling(requests: Sequence[GenRequest]) -> dict[tuple[float, bool], list[int]]:
    """Indices of requests that can share one generate call (same temperature and ignore_eos)."""
    groups: dict[tuple[float, bool], list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault((request.temperature, request.ignore_eos), []).append(i)
    return groups


def _eos_ids(*candidates: int | list[int] | None) -> frozenset[int]:
    """Every EOS id from the generation config and the tokenizer (some models have several)."""
    ids: set[int] = set()
    for candidate in candidates:
        if isinstance(candidate, int):
            ids.add(candidate)
        elif candidate:
            ids.update(candidate)
    return frozenset(ids)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
