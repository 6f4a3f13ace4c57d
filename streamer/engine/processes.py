"""Data parallelism across devices: one engine per device, each in a process of its own.

`ProcessEngines` looks like one `Engine` to `ContinuousPool` (`add`, `step`, `idle`, `on_token`), so
there is still one async front end that tokenizes, builds results and applies backpressure. Each
`add` goes to the live child with the fewest outstanding tokens (prompt + answer room of requests
not finished yet). A child loads the model itself on its device, takes requests between steps and
sends back, once per step, what finished and which tokens it sampled.

A child that dies (killed, out of memory) does not hang its callers: the death is logged and its
unfinished requests start over on a live child; tokens already streamed are not streamed twice (a
sampled answer may then differ after them; a greedy one does not). With no child left they finish
with an error. Timings stay comparable because `time.monotonic` is one clock for all processes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from streamer.config import EngineSettings
from streamer.engine.build import engine_config
from streamer.engine.engine import Engine, Finished, TokenRequest
from streamer.engine.worker import LLMWorker
from streamer.models.loader import load_model

log = logging.getLogger(__name__)

_POLL_S = 0.01  # longest wait for a child's report before the pool thread looks at new arrivals again
_PARENT_CHECK_S = 1.0  # an idle child checks this often whether its parent still lives


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
    """One child per CUDA device (`cuda:0`..), or `workers` CPU children sharing the cores."""
    if worker.loaded.directory is None:
        raise ValueError("engine worker processes load the model from its directory; this model has none")
    on_cuda = worker.device.type == "cuda"
    threads = None if on_cuda else max(1, (os.cpu_count() or 1) // workers)
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
    """One child step: what finished, the tokens sampled (in order), and the child's state after it."""

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
                    spec.end_ids)
    tokens: list[tuple[Hashable, int]] = []
    engine.on_token = lambda key, token: tokens.append((key, token))
    while True:
        arrived = _arrivals(inbox, block=engine.idle)
        if None in arrived:
            return
        finished = [f for a in arrived if a is not None and (f := engine.add(a.key, a.request, a.deadline_s))]
        finished += engine.step()
        if finished or tokens:
            outbox.send(_Report(finished, tokens, engine.scheduler.waiting, engine.last_step_size,
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
    alive: bool = True
    load: int = 0  # outstanding tokens
    waiting: int = 0  # requests it has not admitted yet, as last reported
    kv: tuple[int, int, int] = (0, 0, 0)  # its KV usage, as last reported
    routed: int = 0  # requests ever sent to it


@dataclass(eq=False)
class _Pending:
    request: TokenRequest
    deadline_s: float
    child: _Child | None = None
    streamed: int = 0  # tokens handed to on_token
    skip: int = 0  # tokens a retry on another child will repeat: already streamed


@dataclass(eq=False)
class ProcessEngines:
    """Engines in child processes behind the `Engine` interface `ContinuousPool` drives."""

    specs: Sequence[ChildSpec]
    on_token: Any = None  # Callable[[Hashable, int], None] | None, as on Engine
    last_step_size: int = 0
    _children: list[_Child] = field(default_factory=list, init=False)
    _pending: dict[Hashable, _Pending] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        for i, spec in enumerate(self.specs):
            inbox = context.Queue()
            results, outbox = context.Pipe(duplex=False)
            process = context.Process(target=serve_child, args=(spec, inbox, outbox), name=f"llm-engine-{i}",
                                      daemon=True)
            process.start()
            outbox.close()  # the child holds the writing end; its death then reads as EOF here
            self._children.append(_Child(process, inbox, results))
        log.info("engine worker processes started: pids %s on %s", self.pids, [s.device for s in self.specs])

    @property
    def pids(self) -> list[int | None]:
        return [c.process.pid for c in self._children]

    @property
    def routed(self) -> list[int]:
        """Requests sent to each child so far (retries included)."""
        return [c.routed for c in self._children]

    @property
    def idle(self) -> bool:
        return not self._pending

    @property
    def scheduler(self) -> ProcessEngines:
        """`ContinuousPool.depth` reads `engine.scheduler.waiting`."""
        return self

    @property
    def waiting(self) -> int:
        return sum(c.waiting for c in self._children if c.alive)

    def kv_usage(self) -> tuple[int, int, int]:
        """Engine.kv_usage summed over the live children, as they last reported."""
        live = [c.kv for c in self._children if c.alive]
        return (sum(k[0] for k in live), sum(k[1] for k in live), sum(k[2] for k in live))

    def add(self, key: Hashable, request: TokenRequest, deadline_s: float) -> Finished | None:
        """Send a request to the least loaded live child; with none left it finishes at once with an error."""
        return self._route(key, _Pending(request, deadline_s))

    def step(self) -> list[Finished]:
        """What the children finished since the last call; waits up to `_POLL_S` for news, never spins."""
        self.last_step_size = 0
        live = [c for c in self._children if c.alive]
        wait([c.results for c in live] + [c.process.sentinel for c in live], timeout=_POLL_S)
        finished = [f for child in live for f in self._drain(child)]
        return finished + self._reap()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every child (after the pool drained them), killing any that does not exit in time."""
        for child in self._children:
            if child.alive:
                with contextlib.suppress(OSError, ValueError):
                    child.inbox.put(None)
        for child in self._children:
            child.process.join(timeout_s)
            if child.process.is_alive():
                log.warning("engine worker pid %s did not stop; killing it", child.process.pid)
                child.process.kill()
                child.process.join()
            child.alive = False
            child.inbox.cancel_join_thread()
            child.inbox.close()
            child.results.close()

    def _route(self, key: Hashable, pending: _Pending) -> Finished | None:
        live = [c for c in self._children if c.alive]
        if not live:
            now = time.monotonic()
            return Finished(key, [], [], now, None, 0, error="every engine worker process has died")
        child = min(live, key=lambda c: c.load)
        pending.child = child
        child.load += pending.request.longest
        child.routed += 1
        self._pending[key] = pending
        child.inbox.put(_Add(key, pending.request, pending.deadline_s))
        return None

    def _drain(self, child: _Child) -> list[Finished]:
        finished: list[Finished] = []
        try:
            while child.results.poll():
                finished += self._take(child, child.results.recv())
        except (EOFError, OSError):
            pass  # the child is gone; _reap retries what it held
        return finished

    def _take(self, child: _Child, report: _Report) -> list[Finished]:
        child.waiting = report.waiting
        child.kv = report.kv
        self.last_step_size += report.step_size
        for key, token in report.tokens:
            pending = self._pending.get(key)
            if pending is None or pending.child is not child:
                continue
            if pending.skip:
                pending.skip -= 1
                continue
            pending.streamed += 1
            if self.on_token is not None:
                self.on_token(key, token)
        finished = []
        for done in report.finished:
            pending = self._pending.get(done.key)
            if pending is not None and pending.child is child:
                del self._pending[done.key]
                child.load -= pending.request.longest
                finished.append(done)
        return finished

    def _reap(self) -> list[Finished]:
        """Notice dead children and start their unfinished requests over elsewhere."""
        finished: list[Finished] = []
        for child in self._children:
            if not child.alive or child.process.exitcode is None:
                continue
            finished += self._drain(child)
            child.alive = False
            orphans = [(key, p) for key, p in self._pending.items() if p.child is child]
            log.error("engine worker pid %s died (exit code %s); retrying its %d requests on the others",
                      child.process.pid, child.process.exitcode, len(orphans))
            for key, pending in orphans:
                del self._pending[key]
                pending.skip = pending.streamed
                if (failed := self._route(key, pending)) is not None:
                    finished.append(failed)
        return finished
