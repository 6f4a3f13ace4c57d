"""The resident model worker: batched chat generation and label scoring, synchronous (the async side
runs it in a thread).

Scoring classifies without free generation: each label is scored by the model's log-likelihood of
answering it, so the answer is always one of the labels and does not depend on sampling.

A batch that raises is split in halves and retried, so one bad request becomes one error
result (a dead letter upstream) instead of failing its whole batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from streamer.engine.backend import BackendInfo
from streamer.engine.grammar import Constraint, Grammars, allow_only
from streamer.engine.requests import (
    GenRequest,
    GenResult,
    Request,
    Result,
    ScoreRequest,
    ScoreResult,
    label_score,
    samples,
)
from streamer.models.loader import LoadedModel
from streamer.models.memory import resident_bytes

log = logging.getLogger(__name__)

WARM_UP_MESSAGES = ({"role": "user", "content": "Hi"},)

Req = TypeVar("Req")
Res = TypeVar("Res")


class _RowLimits(StoppingCriteria):
    """Marks each row done at its own max_new_tokens, so the batch stops once every row is done."""

    def __init__(self, prompt_len: int, limits: torch.Tensor) -> None:
        self.prompt_len = prompt_len
        self.limits = limits

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done: torch.BoolTensor = (input_ids.shape[1] - self.prompt_len) >= self.limits  # type: ignore[assignment]
        return done  # a bool tensor; torch's stubs type the comparison as a plain Tensor


class _Constrained(LogitsProcessor):
    """Masks, row by row, the tokens each row's grammar forbids (rows without a schema are left alone)."""

    def __init__(self, prompt_len: int, constraints: Sequence[Constraint | None], stop_ids: frozenset[int]) -> None:
        self.prompt_len = prompt_len
        self.rows = [(n, c) for n, c in enumerate(constraints) if c is not None]
        self.stop_ids = stop_ids
        self.ended: set[int] = set()  # rows past their stop token: padding follows, which no grammar is told

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_len:
            for n, constraint in self.rows:
                token = int(input_ids[n, -1])
                if token in self.stop_ids:
                    self.ended.add(n)
                elif n not in self.ended:
                    constraint.accept(token)
        allow_only(scores, self.rows)
        return scores


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
        self.grammars = Grammars(self.tokenizer, self.model.config.vocab_size, self.eos_ids)
        # prompt_tokens runs on the event loop while generate runs in the worker thread, and a fast
        # tokenizer's padding/truncation settings are shared mutable state in the Rust backend.
        self._tokenizer_lock = threading.Lock()

    def prompt_tokens(self, request: Sequence[Mapping[str, str]] | Request) -> int:
        """Token count of the templated prompt, for the batcher's token budget.

        A score request counts its prompt once per label: each label is a row of its own.
        """
        if isinstance(request, ScoreRequest):
            return self.prompt_tokens(request.messages) * len(request.labels)
        messages = request.messages if isinstance(request, GenRequest) else request
        return int(self._encode([messages])["attention_mask"].sum())

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, f"{self.device} ({self.loaded.dtype})", self.loaded.manifest,
                           resident_bytes(self.model))

    def text_tokens(self, text: str) -> int:
        """Token count of a bare text (window token budgets and statistics)."""
        with self._tokenizer_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def warm_up(self) -> None:
        """Run one tiny padded batch so kernels and allocator are ready before the first real batch."""
        short = GenRequest(WARM_UP_MESSAGES, max_new_tokens=2)
        longer = GenRequest(({"role": "user", "content": "Say hello to everyone."},), max_new_tokens=2)
        self.generate([short, longer])

    def run(self, requests: Sequence[Request]) -> list[Result]:
        """Results aligned with a mixed batch; generate and score requests each go to their own call."""
        gen: list[tuple[int, GenRequest]] = []
        scoring: list[tuple[int, ScoreRequest]] = []
        for i, request in enumerate(requests):
            if isinstance(request, GenRequest):
                gen.append((i, request))
            elif isinstance(request, ScoreRequest):
                scoring.append((i, request))
            else:
                raise TypeError(f"not a GenRequest or ScoreRequest: {type(request).__name__}")
        by_index: dict[int, Result] = {}
        by_index.update(zip([i for i, _ in gen], self.generate([r for _, r in gen]), strict=True))
        by_index.update(zip([i for i, _ in scoring], self.score([r for _, r in scoring]), strict=True))
        return [by_index[i] for i in range(len(requests))]

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Results aligned with `requests`; requests are grouped by sampling settings."""
        by_index: dict[int, GenResult] = {}
        for indices in _group_by_sampling(requests).values():
            group = [requests[i] for i in indices]
            results = self._isolating(group, self._generate_batch, self._failed_generation)
            by_index.update(zip(indices, results, strict=True))
        return [by_index[i] for i in range(len(requests))]

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Results aligned with `requests`: every (prompt, label) pair of the batch in one forward pass."""
        if not requests:
            return []
        return self._isolating(requests, self._score_batch, self._failed_score)

    def _isolating(
        self,
        requests: Sequence[Req],
        run_batch: Callable[[Sequence[Req]], list[Res]],
        failed: Callable[[Req, str], Res],
    ) -> list[Res]:
        """Run a batch; on failure split it in halves, down to single failed requests."""
        try:
            return run_batch(requests)
        except Exception as exc:
            self.after_failure()
            if len(requests) == 1:
                log.warning("a single request failed: %r", exc)
                return [failed(requests[0], _describe(exc))]
            log.info("batch of %d failed (%r); retrying in halves", len(requests), exc)
            half = len(requests) // 2
            head = self._isolating(requests[:half], run_batch, failed)
            return head + self._isolating(requests[half:], run_batch, failed)

    def _failed_generation(self, request: GenRequest, error: str) -> GenResult:
        return GenResult("", self._safe_prompt_tokens(request), 0, error=error)

    def _failed_score(self, request: ScoreRequest, error: str) -> ScoreResult:
        return ScoreResult("", {}, self._safe_prompt_tokens(request), error=error)

    def _generate_batch(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """One `model.generate` call for requests sharing temperature and ignore_eos."""
        enc = self._encode([r.messages for r in requests])
        prompt_len = enc["input_ids"].shape[1]
        limits = [r.max_new_tokens for r in requests]
        kwargs = self._generation_kwargs(requests[0], max(limits))
        stop = _RowLimits(prompt_len, torch.tensor(limits, device=self.device))
        if any(r.schema is not None for r in requests):
            constraints = [None if r.schema is None else self.grammars.constraint(r.schema) for r in requests]
            kwargs["logits_processor"] = LogitsProcessorList([_Constrained(prompt_len, constraints, self.eos_ids)])
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs, stopping_criteria=StoppingCriteriaList([stop]))  # type: ignore[operator]  # GenerationMixin.generate is typed as a Tensor attribute
        generated = out[:, prompt_len:].tolist()
        tokens_in = enc["attention_mask"].sum(dim=1).tolist()
        return [
            self.gen_result(row, n_in, r) for row, n_in, r in zip(generated, tokens_in, requests, strict=True)
        ]

    def gen_result(self, row: Sequence[int], tokens_in: int, request: GenRequest) -> GenResult:
        """A row of generated tokens as the answer: cut at the request's limit and first EOS, decoded."""
        kept = trim_generated(row, request.max_new_tokens, self.eos_ids, request.ignore_eos)
        return GenResult(text=self.decode(kept), tokens_in=int(tokens_in), tokens_out=len(kept))

    def decode(self, tokens: Sequence[int]) -> str:
        """Generated tokens as the answer text (special tokens dropped, outer whitespace trimmed)."""
        with self._tokenizer_lock:
            text: str = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
            return text.strip()

    def _generation_kwargs(self, request: GenRequest, max_new_tokens: int) -> dict[str, Any]:
        """Greedy for temperature 0 (or one too small to divide by), sampling otherwise; no EOS for ignore_eos."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": self.pad_id,
            "eos_token_id": sorted(self.eos_ids),
            "do_sample": samples(request.temperature),
        }
        if samples(request.temperature):
            kwargs["temperature"] = request.temperature
        if request.ignore_eos:
            kwargs["min_new_tokens"] = max_new_tokens
        return kwargs

    def _score_batch(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """One forward pass over prompt+label rows, left-padded so every label ends the row."""
        prompts = self.prompt_ids([r.messages for r in requests])
        label_ids = [self.label_ids(r.labels) for r in requests]
        pairs = [(p, ids) for p, labels in zip(prompts, label_ids, strict=True) for ids in labels]
        input_ids, mask = _left_pad([p + ids for p, ids in pairs], self.pad_id, self.device)
        # Forward (unlike generate) numbers positions 0..L-1 whatever the padding; count real tokens.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        width = max(len(ids) for _, ids in pairs)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                logits_to_keep=width + 1,
                use_cache=False,
            )
        lengths = [len(ids) for _, ids in pairs]
        logprobs = iter(_label_logprobs(out.logits, input_ids, lengths, sorted(self.eos_ids)))
        return [
            self.score_result(r, len(p), [label_score(next(logprobs)) for _ in r.labels])
            for r, p in zip(requests, prompts, strict=True)
        ]

    def score_result(self, request: ScoreRequest, tokens_in: int, values: list[float]) -> ScoreResult:
        """The best label wins; a tie goes to the label listed first."""
        scores = dict(zip(request.labels, values, strict=True))
        best = max(request.labels, key=scores.__getitem__)
        return ScoreResult(label=best, scores=scores, tokens_in=tokens_in)

    def prompt_ids(self, conversations: Sequence[Sequence[Mapping[str, str]]]) -> list[list[int]]:
        """Unpadded templated prompts ending in the assistant header, where the label will follow."""
        return [list(ids) for ids in self._apply_template(conversations)["input_ids"]]

    def label_ids(self, labels: Sequence[str]) -> list[list[int]]:
        """Label tokens as the model would write them at the start of its answer, specials as text."""
        with self._tokenizer_lock:
            enc = self.tokenizer(list(labels), add_special_tokens=False, split_special_tokens=True)
        return [list(ids) for ids in enc["input_ids"]]

    def _apply_template(self, conversations: Sequence[Sequence[Mapping[str, str]]], **options: Any) -> Any:
        """The chat template, ending in the assistant header; control tokens typed by users stay text."""
        with self._tokenizer_lock:
            return self.tokenizer.apply_chat_template(
                [list(c) for c in conversations],
                add_generation_prompt=True,
                tokenize=True,
                sanitize_control_tokens=True,
                return_dict=True,
                **options,
            )

    def _encode(self, conversations: Sequence[Sequence[Mapping[str, str]]]) -> dict[str, torch.Tensor]:
        """Templated, left-padded prompts as tensors on the model's device."""
        enc = self._apply_template(conversations, padding=True, return_tensors="pt")
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
        }

    def _safe_prompt_tokens(self, request: Request) -> int:
        """Prompt size for an error result; 0 when the prompt itself cannot be built."""
        try:
            return self.prompt_tokens(request.messages)
        except Exception:
            return 0

    def after_failure(self) -> None:
        """Release cached CUDA memory, since the likeliest batch failure is running out of it."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _group_by_sampling(requests: Sequence[GenRequest]) -> dict[tuple[float, bool], list[int]]:
    """Indices of requests that can share one generate call (same temperature and ignore_eos)."""
    groups: dict[tuple[float, bool], list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault((request.temperature, request.ignore_eos), []).append(i)
    return groups


def _left_pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask for rows padded on the left to the longest row."""
    width = max(len(row) for row in rows)
    ids = [[pad_id] * (width - len(row)) + row for row in rows]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def _label_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, lengths: Sequence[int], end_ids: Sequence[int]
) -> list[list[float]]:
    """Per row: log-probs of its last `lengths[i]` tokens (the label), then of ending the answer there.

    `logits` holds the last width+1 positions; position t predicts token t+1, so the first width
    of them predict the last width tokens (a shorter label uses only its tail) and the last one
    predicts what follows the label: any EOS id ends the answer.
    """
    width = logits.shape[1] - 1
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs[:, :-1].gather(-1, input_ids[:, -width:].unsqueeze(-1)).squeeze(-1).tolist()
    ends = torch.logsumexp(logprobs[:, -1, list(end_ids)], dim=-1).tolist()
    return [[*row[width - n :], end] for row, n, end in zip(picked, lengths, ends, strict=True)]


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
