"""The continuous-batching engine: requests in, one model step at a time, results out.

Synchronous and single-threaded on purpose: the pool runs it in the worker thread and feeds it
between steps. A generate request is one sequence. A score (classify) request first prefills its
prompt once; its label rows then start from the prompt's cached blocks, so each label costs only
the prompt's last partial block plus the label's own tokens, all in one step.

A step that raises (the model, or sampling logits that hold inf or NaN) is not the fault of every
sequence in it: they are all queued again and run one at a time, and only a sequence that fails alone
gets an error result (a dead letter upstream).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import cast

import torch
from transformers import PreTrainedModel

from streamer.engine.adaptive import StepSizer
from streamer.engine.blocks import BlockAllocator
from streamer.engine.grammar import Constraint, Grammars, allow_only
from streamer.engine.paged import PagedKV, PagedRunner, Row, Shape
from streamer.engine.requests import samples
from streamer.engine.scheduler import Plan, Scheduler, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 2048
    max_running: int = 32
    max_step_tokens: int = 512
    target_step_s: float | None = None  # adaptive step budget; None: always max_step_tokens
    pinned_sessions: int = 64  # conversations whose last turn's blocks are pinned (least recently used go)


BROKEN_TOKEN = -1
"""What an engine hands `on_token` in place of a token when the tokens it streamed for a request no longer lead
to its answer (a retry that sampled others): no more tokens of the request follow (`ProcessEngines`)."""


@dataclass(frozen=True)
class TokenRequest:
    """What the engine runs: token ids in, token ids (or label log-probs) out; text stays with the worker.

    With `labels`, a score request: no generation; each label's log-probs are returned instead.
    With `session`, the conversation it continues: its blocks are pinned for the session's next turn.
    With `schema`, the JSON Schema (canonical text) its answer is decoded under: only tokens its grammar allows.
    """

    prompt: tuple[int, ...]
    max_new_tokens: int = 0
    temperature: float = 0.0
    stop_ids: frozenset[int] = frozenset()
    labels: tuple[tuple[int, ...], ...] = ()
    session: str | None = None
    schema: str | None = None

    @property
    def longest(self) -> int:
        """Tokens the request may ever hold in the cache."""
        if self.labels:
            return len(self.prompt) + max(len(label) for label in self.labels)
        return len(self.prompt) + self.max_new_tokens


@dataclass(frozen=True)
class Finished:
    """A finished request with its timing (engine clock, monotonic seconds).

    `tokens`: the generated ids (a stop id included if one ended it); `label_logprobs`: per label,
    the log-probs of its tokens and then of the answer ending; `error` when it failed alone.
    """

    key: Hashable
    tokens: list[int]
    label_logprobs: list[list[float]]
    admitted_s: float
    first_token_s: float | None
    steps: int
    error: str | None = None

    @classmethod
    def failed(cls, key: Hashable, error: str) -> Finished:
        """A request answered with an error without a step of its own."""
        now = time.monotonic()
        return cls(key, [], [], now, None, 0, error)


def admit(add: Callable[[Hashable, TokenRequest, float], Finished | None], key: Hashable, request: TokenRequest,
          deadline_s: float) -> Finished | None:
    """`add(key, request, deadline_s)` (an engine's), answering a request it raises on with the error:
    an engine bug one input triggers costs that input, not the thread or process serving every other."""
    try:
        return add(key, request, deadline_s)
    except Exception as exc:
        log.exception("the engine could not take a request")
        return Finished.failed(key, f"{type(exc).__name__}: {exc}")


@dataclass(eq=False)
class _Job:
    key: Hashable
    request: TokenRequest
    deadline_s: float
    admitted_s: float | None = None
    first_token_s: float | None = None
    steps: int = 0
    label_logprobs: dict[int, list[float]] = field(default_factory=dict)
    suspect: bool = False  # was in a failed step; runs alone until it passes
    constraint: Constraint | None = None  # the grammar state of a request with a schema


class Engine:
    def __init__(self, model: PreTrainedModel, config: EngineConfig, end_ids: frozenset[int],
                 grammars: Grammars | None = None) -> None:
        """`end_ids` end an answer (EOS ids): a label's score includes the answer ending right after it.
        `grammars` constrain requests with a schema; without them such a request fails."""
        self.model = model
        self.config = config
        self.end_ids = sorted(end_ids)
        self.allocator = BlockAllocator(config.num_blocks, config.block_size, config.pinned_sessions)
        self.scheduler = Scheduler(self.allocator, config.max_running, config.max_step_tokens)
        device = next(model.parameters()).device
        kv = PagedKV(Shape.of(model), config.num_blocks, config.block_size, model.dtype, device)
        self.runner = PagedRunner(model, kv)
        self.sizer = StepSizer(config.target_step_s, lowest=config.max_running + config.block_size,
                               highest=config.max_step_tokens)
        self.on_token: Callable[[Hashable, int], None] | None = None  # hears each generated token (streaming)
        self.grammars = grammars
        self._suspects = 0
        self.last_step_size = 0

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    @property
    def alive(self) -> bool:
        """Always: it runs in the caller's thread, so it serves while that thread does."""
        return True

    @property
    def waiting(self) -> int:
        """Requests not admitted yet."""
        return self.scheduler.waiting

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    def kv_usage(self) -> tuple[int, int, int]:
        """(blocks used, blocks in all, prompt tokens reused from the prefix cache so far), for metrics."""
        return self.allocator.in_use, self.allocator.num_blocks, self.scheduler.reused_tokens

    def add(self, key: Hashable, request: TokenRequest, deadline_s: float) -> Finished | None:
        """Queue a request; a request that can never fit the cache finishes at once with an error."""
        job = _Job(key, request, deadline_s)
        if not self.scheduler.fits(request.longest):
            return self._failed(job, f"prompt and answer ({request.longest} tokens) exceed the KV cache")
        if request.schema is not None:
            if self.grammars is None:
                return self._failed(job, "this engine has no tokenizer grammars; it cannot decode under a schema")
            job.constraint = self.grammars.constraint(request.schema)
        prompt = list(request.prompt)
        self.scheduler.add(self._sequence(job, prompt, request.max_new_tokens, 1, session=request.session))
        return None

    def step(self) -> list[Finished]:
        """Run one model step; returns the requests that finished in it."""
        self.scheduler.max_step_tokens = self.sizer.budget()
        plan = self.scheduler.schedule()
        if not plan.chunks:
            self.last_step_size = 0
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
            self.sizer.observe(plan.tokens, time.monotonic() - now)
            sampled, tails = self._sample(plan, logits)  # raises on logits no softmax can sample (inf, NaN)
        except Exception as exc:
            return self._step_failed(plan, exc)
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
            rows = logits[[i for _, i in picks]]  # a copy: masking it leaves `logits` alone
            constrained = [(n, job.constraint) for n, (seq, _) in enumerate(picks)
                           if (job := _job(seq)).constraint is not None]
            if constrained:
                allow_only(rows, constrained)
            greedy = rows.argmax(dim=-1).tolist()
            for n, (seq, _) in enumerate(picks):
                temperature = _job(seq).request.temperature
                if samples(temperature):
                    probs = torch.softmax(rows[n] / temperature, dim=-1)
                    sampled[id(seq)] = int(torch.multinomial(probs, 1))
                else:
                    sampled[id(seq)] = greedy[n]
        return sampled, tails

    def _settle(self, plan: Plan, done: list[Sequence], tails: dict[int, torch.Tensor]) -> list[Finished]:
        now = time.monotonic()
        for chunk in plan.chunks:
            seq, job = chunk.seq, _job(chunk.seq)
            if chunk.sample and len(seq.tokens) > seq.prompt_len and not job.request.labels:
                job.first_token_s = job.first_token_s or now
                token = seq.tokens[-1]
                if job.constraint is not None and token not in seq.stop_ids:
                    job.constraint.accept(token)
                if self.on_token is not None and token not in seq.stop_ids:
                    self.on_token(job.key, token)
            if job.suspect and chunk.sample:
                job.suspect = False
                self._suspects -= 1
                self._isolate()
        finished: list[Finished] = []
        for seq in done:
            job, label = _payload(seq)
            if not job.request.labels:
                broke = job.constraint.error if job.constraint is not None else None
                finished.append(self._finished(job, tokens=seq.generated,
                                               error=None if broke is None else f"the schema's grammar broke: {broke}"))
            elif label is None:  # the score prompt is cached: now its label rows
                self._add_label_rows(job)
            else:
                job.label_logprobs[label] = self._label_logprobs(seq, tails[id(seq)], len(job.request.labels[label]))
                if len(job.label_logprobs) == len(job.request.labels):
                    ordered = [job.label_logprobs[i] for i in range(len(job.request.labels))]
                    finished.append(self._finished(job, label_logprobs=ordered))
        return finished

    def _add_label_rows(self, job: _Job) -> None:
        for i, ids in enumerate(job.request.labels):
            self.scheduler.add(self._sequence(job, [*job.request.prompt, *ids], 0, len(ids) + 1, label=i))

    def _label_logprobs(self, seq: Sequence, tail: torch.Tensor, length: int) -> list[float]:
        """Log-probs of the label's tokens, then of ending the answer right after them."""
        logprobs = torch.log_softmax(tail, dim=-1)
        label = seq.tokens[-length:]
        picked = [float(logprobs[i, token]) for i, token in enumerate(label)]
        return [*picked, float(torch.logsumexp(logprobs[-1, self.end_ids], dim=-1))]

    def _sequence(self, job: _Job, tokens: list[int], max_new: int, tail: int, label: int | None = None,
                  session: str | None = None) -> Sequence:
        return Sequence(tokens, max_new, job.deadline_s, job.request.stop_ids, tail, payload=(job, label),
                        session=session)

    def _step_failed(self, plan: Plan, exc: Exception) -> list[Finished]:
        """Requeue every sequence of the failed step to run alone; one that failed alone is answered with the error."""
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()  # the likeliest failure is running out of memory
        seqs = [c.seq for c in plan.chunks]
        self.scheduler.abort(seqs)
        if len(seqs) == 1 and _job(seqs[0]).suspect:
            job = _job(seqs[0])
            log.warning("a request failed alone: %r", exc)
            self._suspects -= 1
            self.scheduler.abort([s for s in self.scheduler.sequences() if _job(s) is job])  # its other label rows
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

    def _isolate(self) -> None:
        self.scheduler.max_running = 1 if self._suspects else self.config.max_running

    def _failed(self, job: _Job, error: str) -> Finished:
        return self._finished(job, error=error)

    def _finished(self, job: _Job, tokens: list[int] | None = None, label_logprobs: list[list[float]] | None = None,
                  error: str | None = None) -> Finished:
        now = time.monotonic()
        return Finished(job.key, tokens or [], label_logprobs or [], job.admitted_s or now, job.first_token_s,
                        job.steps, error)


def _payload(seq: Sequence) -> tuple[_Job, int | None]:
    """(job, label index): what every engine sequence carries (the scheduler keeps it as an opaque object)."""
    return cast(tuple[_Job, int | None], seq.payload)


def _job(seq: Sequence) -> _Job:
    return _payload(seq)[0]
