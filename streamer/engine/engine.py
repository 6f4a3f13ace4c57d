"""The continuous-batching engine: requests in, one model step at a time, results out.

Synchronous and single-threaded on purpose: the pool runs it in the worker thread and feeds it
between steps. A generate request is one sequence. A score (classify) request first prefills its
prompt once; its label rows then start from the prompt's cached blocks, so each label costs only
the prompt's last partial block plus the label's own tokens, all in one step.

A step that raises is not the fault of every sequence in it: they are all queued again and run one
at a time, and only a sequence that fails alone gets an error result (a dead letter upstream).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from streamer.batching.adaptive import StepSizer
from streamer.engine.blocks import BlockAllocator
from streamer.engine.paged import PagedKV, PagedRunner, Row, Shape
from streamer.engine.scheduler import Plan, Scheduler, Sequence
from streamer.engine.worker import (
    GenRequest,
    GenResult,
    LLMWorker,
    Request,
    Result,
    ScoreRequest,
    ScoreResult,
    label_score,
    trim_generated,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 2048
    max_running: int = 32
    max_step_tokens: int = 512
    target_step_s: float | None = None  # adaptive step budget; None: always max_step_tokens


@dataclass(frozen=True)
class Finished:
    """A finished request with its timing (engine clock, monotonic seconds)."""

    key: Hashable
    result: Result
    admitted_s: float
    first_token_s: float | None
    steps: int  # model steps that worked on it


@dataclass(eq=False)
class _Job:
    key: Hashable
    request: Request
    deadline_s: float
    prompt: list[int]
    admitted_s: float | None = None
    first_token_s: float | None = None
    steps: int = 0
    label_ids: list[list[int]] = field(default_factory=list)
    label_scores: dict[int, float] = field(default_factory=dict)
    suspect: bool = False  # was in a failed step; runs alone until it passes


class Engine:
    def __init__(self, worker: LLMWorker, config: EngineConfig) -> None:
        self.worker = worker
        self.config = config
        self.allocator = BlockAllocator(config.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.allocator, config.max_running, config.max_step_tokens)
        kv = PagedKV(Shape.of(worker.model), config.num_blocks, config.block_size, worker.loaded.dtype, worker.device)
        self.runner = PagedRunner(worker.model, kv)
        self.sizer = StepSizer(config.target_step_s, lowest=config.max_running + config.block_size,
                               highest=config.max_step_tokens)
        self.on_token: Callable[[Hashable, int], None] | None = None  # hears each generated token (streaming)
        self._suspects = 0
        self.last_step_size = 0

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    def add(self, key: Hashable, request: Request, deadline_s: float) -> Finished | None:
        """Queue a request; a request that can never fit the cache finishes at once with an error."""
        prompt = self.worker.prompt_ids([request.messages])[0]
        job = _Job(key, request, deadline_s, prompt)
        if isinstance(request, ScoreRequest):
            job.label_ids = self.worker.label_ids(request.labels)
            longest = len(prompt) + max(len(ids) for ids in job.label_ids)
            need, sequence = longest, self._sequence(job, prompt, 0, 1)
        else:
            need = len(prompt) + request.max_new_tokens
            sequence = self._sequence(job, prompt, request.max_new_tokens, 1)
        if not self.scheduler.fits(need):
            return self._failed(job, f"prompt and answer ({need} tokens) exceed the KV cache")
        self.scheduler.add(sequence)
        return None

    def step(self) -> list[Finished]:
        """Run one model step; returns the requests that finished in it."""
        self.scheduler.max_step_tokens = self.sizer.budget()
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        now = time.monotonic()
        for chunk in plan.chunks:
            job = _job(chunk.seq)
            job.steps += 1
            if job.admitted_s is None:
                job.admitted_s = now
        self.last_step_size = len(plan.chunks)
        try:
            logits = self.runner.step([self._row(c.seq, c.start, c.end, c.sample) for c in plan.chunks])
        except Exception as exc:
            return self._step_failed(plan, exc)
        self.sizer.observe(plan.tokens, time.monotonic() - now)
        sampled, tails = self._sample(plan, logits)
        done = self.scheduler.complete(plan, sampled)
        return self._settle(plan, done, tails)

    def _row(self, seq: Sequence, start: int, end: int, sample: bool) -> Row:
        return Row(seq.tokens[start:end], start, end, seq.blocks, seq.logits_tail if sample else 0)

    def _sample(self, plan: Plan, logits: torch.Tensor) -> tuple[dict[int, int], dict[int, torch.Tensor]]:
        """Next token per sampling sequence (greedy, or softmax sampling at the request's temperature),
        and the logits tails of label rows."""
        sampled: dict[int, int] = {}
        tails: dict[int, torch.Tensor] = {}
        at = 0
        picks: list[tuple[Sequence, int]] = []
        for chunk in plan.chunks:
            if not chunk.sample:
                continue
            seq = chunk.seq
            if seq.logits_tail > 1:
                tails[id(seq)] = logits[at : at + seq.logits_tail]
            else:
                picks.append((seq, at))
            at += seq.logits_tail
        if picks:
            rows = logits[[i for _, i in picks]]
            greedy = rows.argmax(dim=-1).tolist()
            for n, (seq, _) in enumerate(picks):
                request = _job(seq).request
                temperature = request.temperature if isinstance(request, GenRequest) else 0.0
                if temperature > 0:
                    probs = torch.softmax(rows[n] / temperature, dim=-1)
                    sampled[id(seq)] = int(torch.multinomial(probs, 1))
                else:
                    sampled[id(seq)] = greedy[n]
        return sampled, tails

    def _settle(self, plan: Plan, done: list[Sequence], tails: dict[int, torch.Tensor]) -> list[Finished]:
        now = time.monotonic()
        for chunk in plan.chunks:
            seq, job = chunk.seq, _job(chunk.seq)
            if chunk.sample and isinstance(job.request, GenRequest) and len(seq.tokens) > seq.prompt_len:
                job.first_token_s = job.first_token_s or now
                token = seq.tokens[-1]
                if self.on_token is not None and token not in seq.stop_ids:
                    self.on_token(job.key, token)
            if job.suspect and chunk.sample:
                job.suspect = False
                self._suspects -= 1
                self._isolate()
        finished: list[Finished] = []
        for seq in done:
            job = _job(seq)
            if isinstance(job.request, GenRequest):
                finished.append(self._finished(job, self._gen_result(job, seq)))
            elif seq.payload[1] is None:  # the score prompt is cached: now its label rows
                self._add_label_rows(job)
            else:
                job.label_scores[seq.payload[1]] = label_score(self._label_logprobs(job, seq, tails[id(seq)]))
                if len(job.label_scores) == len(job.label_ids):
                    finished.append(self._finished(job, self._score_result(job)))
        return finished

    def _add_label_rows(self, job: _Job) -> None:
        for i, ids in enumerate(job.label_ids):
            self.scheduler.add(self._sequence(job, job.prompt + ids, 0, len(ids) + 1, label=i))

    def _label_logprobs(self, job: _Job, seq: Sequence, tail: torch.Tensor) -> list[float]:
        """Log-probs of the label's tokens, then of ending the answer right after them."""
        logprobs = torch.log_softmax(tail, dim=-1)
        label = seq.tokens[len(job.prompt) :]
        picked = [float(logprobs[i, token]) for i, token in enumerate(label)]
        end = float(torch.logsumexp(logprobs[-1, sorted(self.worker.eos_ids)], dim=-1))
        return [*picked, end]

    def _gen_result(self, job: _Job, seq: Sequence) -> GenResult:
        request = job.request
        assert isinstance(request, GenRequest)
        kept = trim_generated(seq.generated, request.max_new_tokens, self.worker.eos_ids, request.ignore_eos)
        return GenResult(self.worker.decode(kept), tokens_in=len(job.prompt), tokens_out=len(kept))

    def _score_result(self, job: _Job) -> ScoreResult:
        request = job.request
        assert isinstance(request, ScoreRequest)
        scores = {label: job.label_scores[i] for i, label in enumerate(request.labels)}
        best = max(request.labels, key=scores.__getitem__)
        return ScoreResult(best, scores, tokens_in=len(job.prompt))

    def _sequence(self, job: _Job, tokens: list[int], max_new: int, tail: int, label: int | None = None) -> Sequence:
        request = job.request
        stops = self.worker.eos_ids if isinstance(request, GenRequest) and not request.ignore_eos else frozenset()
        return Sequence(list(tokens), max_new, job.deadline_s, stops, tail, payload=(job, label))

    def _step_failed(self, plan: Plan, exc: Exception) -> list[Finished]:
        """Requeue every sequence of the failed step to run alone; one that failed alone is answered with the error."""
        self.worker.after_failure()
        seqs = [c.seq for c in plan.chunks]
        self.scheduler.abort(seqs)
        if len(seqs) == 1 and _job(seqs[0]).suspect:
            job = _job(seqs[0])
            log.warning("a request failed alone: %r", exc)
            self._suspects -= 1
            self._drop_rows(job)
            self._isolate()
            return [self._failed(job, f"{type(exc).__name__}: {exc}")]
        log.info("a step of %d sequences failed (%r); running them one at a time", len(seqs), exc)
        for seq in seqs:
            job = _job(seq)
            if not job.suspect:
                job.suspect = True
                self._suspects += 1
            self.scheduler.add(seq)
        self._isolate()
        return []

    def _drop_rows(self, job: _Job) -> None:
        """A failed score request's other label rows must not run on."""
        self.scheduler.abort([s for s in self.scheduler.sequences() if _job(s) is job])

    def _isolate(self) -> None:
        self.scheduler.max_running = 1 if self._suspects else self.config.max_running

    def _failed(self, job: _Job, error: str) -> Finished:
        result: Result
        if isinstance(job.request, ScoreRequest):
            result = ScoreResult("", {}, tokens_in=len(job.prompt), error=error)
        else:
            result = GenResult("", tokens_in=len(job.prompt), tokens_out=0, error=error)
        return self._finished(job, result)

    def _finished(self, job: _Job, result: Result) -> Finished:
        now = time.monotonic()
        return Finished(job.key, result, job.admitted_s or now, job.first_token_s, job.steps)


def _job(seq: Sequence) -> _Job:
    job, _ = seq.payload  # type: ignore[misc]  # every engine sequence carries (job, label index)
    return job
