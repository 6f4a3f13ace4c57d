"""Data parallelism across devices: one engine per device, each in a process of its own.

`ProcessEngines` is an `EngineLike` to `ContinuousPool`, as one `Engine` is (`add`, `step`, `idle`,
`waiting`, `on_token`), so there is still one async front end that tokenizes, builds results and
applies backpressure. Each `add` goes to the live child with the fewest outstanding tokens (prompt +
answer room of requests not finished yet). A child loads the model itself on its device, takes
requests between steps and sends back, once per step, what finished and which tokens it sampled.

A child that dies (killed, out of memory) does not hang its callers: the death is logged, its
unfinished requests start over on a live child (tokens already streamed are not streamed twice: the
retry's are compared with them, and where it samples others, or a batch-dependent step differs, the stream
ends with `BROKEN_TOKEN`, so the pieces show the gap; the answer is the retry's), and a new child replaces it after
a backoff: 1 s, doubled for each replacement that dies before it loaded, up to 30 s. While no child
is alive, requests wait for one. The requests a loaded child was running when it died are retried one at a
time (beside new ones), so that the next death names its cause: the one being retried is blamed, and a
request blamed for a second death is answered with an error instead. An input that kills its worker (a
device assert, an OOM kill) then takes its worker down twice, not every worker in turn, and the requests
that died beside it are answered, one child or several. `alive` says whether a child is loaded and serving
(readiness), `restarts` how many were replaced (metrics). Timings stay comparable because
`time.monotonic` is one clock for all processes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import queue
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from streamer.config import EngineSettings
from streamer.engine.engine import BROKEN_TOKEN, Engine, Finished, TokenRequest, admit
from streamer.engine.grammar import Grammars
from streamer.engine.sizing import engine_config
from streamer.engine.worker import LLMWorker
from streamer.models.loader import load_model

log = logging.getLogger(__name__)

_POLL_S = 0.01  # longest wait for a child's report before the pool thread looks at new arrivals again
_PARENT_CHECK_S = 1.0  # an idle child checks this often whether its parent still lives
_RESPAWN_FIRST_S = 1.0  # a dead child is replaced this long after its death ...
_RESPAWN_MAX_S = 30.0  # ... doubled for each replacement that dies before it loaded, up to this
_DEATHS = 2  # a request in flight on this many dying children fails instead of starting over again


@dataclass(frozen=True)
class ChildSpec:
    """What a child needs to load the model and build its engine (picklable: it crosses a spawn)."""

    directory: Path
    device: str
    dtype: str
    settings: EngineSettings
    end_ids: frozenset[int]
    threads: int | None = None


def child_specs(worker: LLMWorker, settings: EngineSettings, workers: int) -> list[ChildSpec]:
    """One child per CUDA device (`cuda:0`..), or `workers` CPU children sharing this process's torch threads
    (`model.threads`, else the cores it may run on)."""
    if worker.loaded.directory is None:
        raise ValueError("engine worker processes load the model from its directory; this model has none")
    on_cuda = worker.device.type == "cuda"
    threads = None if on_cuda else max(1, torch.get_num_threads() // workers)  # model.threads, CPU affinity
    dtype = str(worker.loaded.dtype).removeprefix("torch.")
    return [ChildSpec(worker.loaded.directory, f"cuda:{i}" if on_cuda else "cpu", dtype, settings, worker.eos_ids,
                      threads) for i in range(workers)]


@dataclass(frozen=True)
class _Add:
    key: Hashable
    request: TokenRequest
    deadline_s: float


@dataclass(frozen=True)
class _Report:
    """One child step: what finished, the tokens sampled (in order), and the child's state after it.
    An empty one, sent once the model is loaded, says the child is ready."""

    finished: list[Finished]
    tokens: list[tuple[Hashable, int]]
    waiting: int
    step_size: int
    kv: tuple[int, int, int]  # Engine.kv_usage() after the step


def serve_child(spec: ChildSpec, inbox: Any, outbox: Connection) -> None:
    """A child's whole life: load, then take requests between steps and report each step, until told to stop."""
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    loaded = load_model(spec.directory, device=spec.device, dtype=spec.dtype)
    engine = Engine(loaded.model, engine_config(spec.settings, loaded.model, loaded.dtype, loaded.device),
                    spec.end_ids, Grammars(loaded.tokenizer, loaded.model.config.vocab_size, spec.end_ids))
    tokens: list[tuple[Hashable, int]] = []
    engine.on_token = lambda key, token: tokens.append((key, token))
    outbox.send(_Report([], [], 0, 0, engine.kv_usage()))
    while True:
        arrived = _arrivals(inbox, block=engine.idle)
        if None in arrived:
            return
        finished = [f for a in arrived if a is not None and (f := admit(engine.add, a.key, a.request, a.deadline_s))]
        finished += engine.step()
        if finished or tokens:
            outbox.send(_Report(finished, tokens, engine.waiting, engine.last_step_size,
                                engine.kv_usage()))
            tokens.clear()


def _arrivals(inbox: Any, block: bool) -> list[_Add | None]:
    """Everything queued now; when `block`, first wait for something (or for the parent to be gone)."""
    arrived: list[_Add | None] = []
    while block and not arrived:
        try:
            arrived.append(inbox.get(timeout=_PARENT_CHECK_S))
        except queue.Empty:
            parent = multiprocessing.parent_process()
            if parent is not None and not parent.is_alive():
                return [None]
    while True:
        try:
            arrived.append(inbox.get_nowait())
        except queue.Empty:
            return arrived


@dataclass(eq=False)
class _Child:
    process: BaseProcess
    inbox: Any  # a multiprocessing Queue: puts never block, so parent and child cannot deadlock on pipes
    results: Connection
    backoff_s: float  # how long after its death its replacement starts
    alive: bool = True
    ready: bool = False  # its model is loaded: it reported
    respawn_at: float | None = None  # once dead: when its replacement starts
    load: int = 0  # outstanding tokens
    waiting: int = 0  # requests it has not admitted yet, as last reported
    kv: tuple[int, int, int] = (0, 0, 0)  # its KV usage, as last reported
    routed: int = 0  # requests ever sent to it

    def release(self) -> None:
        """Close this end of its queue and pipe (the child is gone, or has been told to stop)."""
        self.inbox.cancel_join_thread()
        self.inbox.close()
        self.results.close()


@dataclass(eq=False)
class _Pending:
    request: TokenRequest
    deadline_s: float
    child: _Child | None = None  # None: parked, waiting for a child to come alive
    streamed: list[int] = field(default_factory=list)  # tokens handed to on_token
    skip: int = 0  # tokens of a retry on another child to compare with those streamed, not stream again
    broken: bool = False  # a retry diverged from the tokens streamed: on_token had BROKEN_TOKEN, hears no more
    deaths: int = 0  # children that died while it was in flight on them


@dataclass(eq=False)
class ProcessEngines:
    """Engines in child processes behind the `EngineLike` interface `ContinuousPool` drives."""

    specs: Sequence[ChildSpec]
    on_token: Callable[[Hashable, int], None] | None = None  # hears each streamed token, as on Engine
    last_step_size: int = 0
    restarts: int = field(default=0, init=False)  # children replaced after a death
    _children: list[_Child] = field(default_factory=list, init=False)
    _pending: dict[Hashable, _Pending] = field(default_factory=dict, init=False)
    _parked: list[Hashable] = field(default_factory=list, init=False)  # pending keys waiting for a child
    # Requests in flight on a child that died, retried one at a time so that a death names its cause: the
    # suspect running when a child dies is blamed (a second death fails it), the others on that child are not.
    _suspects: collections.deque[Hashable] = field(default_factory=collections.deque, init=False)
    _suspect: Hashable | None = field(default=None, init=False)  # the one retried now

    def __post_init__(self) -> None:
        self._children = [self._spawn(slot, _RESPAWN_FIRST_S) for slot in range(len(self.specs))]
        log.info("engine worker processes started: pids %s on %s", self.pids, [s.device for s in self.specs])

    @property
    def pids(self) -> list[int | None]:
        return [c.process.pid for c in self._children]

    @property
    def routed(self) -> list[int]:
        """Requests sent to each child so far (retries included)."""
        return [c.routed for c in self._children]

    @property
    def alive(self) -> bool:
        """Whether a child has loaded its model and not died since: false while starting, and while every
        child is dead or loading again (deaths are noticed by `step`, which the pool runs even when idle)."""
        return any(c.alive and c.ready for c in self._children)

    @property
    def idle(self) -> bool:
        return not self._pending

    @property
    def waiting(self) -> int:
        """Requests not admitted yet: queued in live children, or waiting for a child to come alive."""
        return len(self._parked) + len(self._suspects) + sum(c.waiting for c in self._children if c.alive)

    def kv_usage(self) -> tuple[int, int, int]:
        """Engine.kv_usage summed over the live children, as they last reported."""
        live = [c.kv for c in self._children if c.alive]
        return (sum(k[0] for k in live), sum(k[1] for k in live), sum(k[2] for k in live))

    def add(self, key: Hashable, request: TokenRequest, deadline_s: float) -> None:
        """Send a request to the least loaded child; with none alive it waits for a replacement."""
        self._pending[key] = pending = _Pending(request, deadline_s)
        self._route(key, pending)

    def step(self) -> list[Finished]:
        """What the children finished since the last call; waits up to `_POLL_S` for news, never spins.
        Dead children are noticed here, and replaced once their backoff is over."""
        self.last_step_size = 0
        self._respawn_due()
        live = [c for c in self._children if c.alive]
        wait([c.results for c in live] + [c.process.sentinel for c in live], timeout=_POLL_S)
        finished = [f for child in live for f in self._drain(child)]
        return finished + self._reap()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every child (after the pool drained them), killing any that does not exit in time."""
        live = [c for c in self._children if c.alive]
        for child in live:
            with contextlib.suppress(OSError, ValueError):
                child.inbox.put(None)
        for child in live:
            child.process.join(timeout_s)
            if child.process.is_alive():
                log.warning("engine worker pid %s did not stop; killing it", child.process.pid)
                child.process.kill()
                child.process.join()
            child.alive = False
            child.release()

    def _spawn(self, slot: int, backoff_s: float) -> _Child:
        context = multiprocessing.get_context("spawn")
        inbox = context.Queue()
        results, outbox = context.Pipe(duplex=False)
        process = context.Process(target=serve_child, args=(self.specs[slot], inbox, outbox),
                                  name=f"llm-engine-{slot}", daemon=True)
        process.start()
        outbox.close()  # the child holds the writing end; its death then reads as EOF here
        return _Child(process, inbox, results, backoff_s)

    def _respawn_due(self) -> None:
        """Replace the dead children whose backoff is over; requests waiting for a child go to them."""
        now = time.monotonic()
        due = [slot for slot, c in enumerate(self._children) if c.respawn_at is not None and c.respawn_at <= now]
        for slot in due:
            backoff_s = min(2 * self._children[slot].backoff_s, _RESPAWN_MAX_S)
            self._children[slot] = self._spawn(slot, backoff_s)
            self.restarts += 1
            log.warning("engine worker %d restarted: pid %s", slot, self._children[slot].process.pid)
        if due:
            parked, self._parked = self._parked, []
            for key in parked:
                self._route(key, self._pending[key])
            self._retry_suspect()

    def _route(self, key: Hashable, pending: _Pending) -> None:
        """To the least loaded child that has loaded its model, else to one loading; with none alive,
        the request is parked until a replacement starts."""
        live = [c for c in self._children if c.alive]
        if not live:
            pending.child = None
            self._parked.append(key)
            return
        child = min([c for c in live if c.ready] or live, key=lambda c: c.load)
        pending.child = child
        child.load += pending.request.longest
        child.routed += 1
        child.inbox.put(_Add(key, pending.request, pending.deadline_s))

    def _drain(self, child: _Child) -> list[Finished]:
        finished: list[Finished] = []
        try:
            while child.results.poll():
                finished += self._take(child, child.results.recv())
        except (EOFError, OSError):
            pass  # the child is gone; _reap retries what it held
        return finished

    def _take(self, child: _Child, report: _Report) -> list[Finished]:
        if not child.ready:
            child.ready = True
            child.backoff_s = _RESPAWN_FIRST_S  # it loaded: a later death starts the backoff over
        child.waiting = report.waiting
        child.kv = report.kv
        self.last_step_size += report.step_size
        for key, token in report.tokens:
            pending = self._pending.get(key)
            if pending is None or pending.child is not child:
                continue
            if pending.broken:
                continue
            if pending.skip:  # a retry's token where one was streamed: sampled (or batch-dependent) may differ
                at = len(pending.streamed) - pending.skip
                pending.skip -= 1
                if token != pending.streamed[at]:
                    pending.broken, pending.skip = True, 0
                    if self.on_token is not None:
                        self.on_token(key, BROKEN_TOKEN)
                continue
            pending.streamed.append(token)
            if self.on_token is not None:
                self.on_token(key, token)
        finished = []
        for done in report.finished:
            pending = self._pending.get(done.key)
            if pending is not None and pending.child is child:
                del self._pending[done.key]
                child.load -= pending.request.longest
                finished.append(done)
                if done.key == self._suspect:
                    self._suspect = None
                    self._retry_suspect()
        return finished

    def _reap(self) -> list[Finished]:
        """Notice dead children: what they sent last, then `_bury` them."""
        finished: list[Finished] = []
        for child in self._children:
            if child.alive and child.process.exitcode is not None:
                finished += self._drain(child)
                finished += self._bury(child)
        return finished

    def _bury(self, child: _Child) -> list[Finished]:
        """Schedule a dead child's replacement and start its requests over. A child that died before it loaded
        ran none of them: they go elsewhere as they were. Otherwise the suspect it was running (see
        `_suspects`) is blamed, and fails on its second dying child, or an input that kills its worker would
        kill every one; the rest become suspects, retried one at a time (returns the failed)."""
        loaded = child.ready
        child.alive = child.ready = False
        child.respawn_at = time.monotonic() + child.backoff_s
        child.release()
        failed: list[Finished] = []
        orphans = [(key, p) for key, p in self._pending.items() if p.child is child]
        for key, pending in orphans:
            pending.skip = len(pending.streamed)
            if not loaded:
                self._route(key, pending)  # a suspect retried there stays the one retried
                continue
            pending.child = None
            blamed = key == self._suspect
            if blamed:
                self._suspect = None
            if blamed or not pending.deaths:  # not a suspect that merely died beside the one retried
                pending.deaths += 1
            if pending.deaths >= _DEATHS:
                del self._pending[key]
                failed.append(Finished.failed(key, f"{pending.deaths} engine worker processes died running it"))
            else:
                self._suspects.append(key)
        self._retry_suspect()
        log.error("engine worker pid %s died (exit code %s)%s; retrying its %d requests, failing %d blamed for a "
                  "second death; restarting it in %.0f s", child.process.pid, child.process.exitcode,
                  "" if loaded else " before it loaded", len(orphans) - len(failed), len(failed), child.backoff_s)
        return failed

    def _retry_suspect(self) -> None:
        """Send the next suspect to a live child unless one is being retried (or none is alive yet)."""
        if self._suspect is not None or not any(c.alive for c in self._children):
            return
        while self._suspects:
            key = self._suspects.popleft()
            pending = self._pending.get(key)
            if pending is not None:
                self._suspect = key
                self._route(key, pending)
                return
