"""Sliding summaries, plain plan vs paned plan: one stream through both, side by side, in one process.

    .venv/bin/python -m bench.panes [--panes 16] [--per-pane 20] [--slide-ms 10000] [--ratio 6]
                                    [--summary-tokens 32] [--json results.json]

The stream: one key, `--per-pane` short messages in every slide-long pane of `--panes` panes (event
times spread evenly), then one flush event of another key far ahead, so the watermark passes every
window, as a backlog read at start would. The route: a sliding `summarize` window of size
ratio x slide, per key, default fold rules (max_events 1000, max_tokens 1500), `summary_tokens` new
tokens per summary, on the real default model on CPU through the service's model pool.

Each plan runs the route's WindowStage (the service's window stage) over the same events: every event
added, one tick closes the windows, and the stage emits them: the plain plan summarises each window's
texts (folding past max_tokens), the paned plan each pane once and combines each window's pane
summaries. Timed: from that tick to the last window result handed to the writer. Prompt tokens are the
model's own count of what it read (GenResult.tokens_in) over every call of the plan, folds included.
Writer and Redis are stand-ins (every window fresh): this measures the stage and the model, not I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from streamer.config import ModelSettings, Route, Settings
from streamer.contracts import WindowResult
from streamer.engine.backend import Backend
from streamer.engine.build import resident
from streamer.engine.load import load_worker
from streamer.kafka.offsets import OffsetTracker
from streamer.outcomes import Outcome, Sealer
from streamer.pipeline.window_stage import WindowStage
from streamer.windows.content import WindowItem

T0 = 1_700_000_000_000
TOPIC = ("events", 0)
SUBJECTS = ["The 8:15 train", "Platform 4", "The ticket office", "The lift at the north exit", "The cafe",
            "The replacement bus", "The 9:02 service to Leeds", "Station staff"]
UPDATES = ["is delayed by twenty minutes because of a signal failure near the junction.",
           "has reopened after the morning cleaning and passengers may board again.",
           "is crowded; travellers are asked to use the front carriages of the train.",
           "is out of order until an engineer arrives later this morning.",
           "now accepts card payments only, as the cash machine is broken.",
           "leaves from the forecourt every fifteen minutes until the line reopens."]


@dataclass
class Run:
    plan: str
    windows: int
    calls: int
    prompt_tokens: int
    elapsed_s: float
    results: list[WindowResult]

    @property
    def tokens_per_window(self) -> float:
        return self.prompt_tokens / self.windows

    @property
    def windows_per_s(self) -> float:
        return self.windows / self.elapsed_s


class Collected:
    """The writer: keeps the window results."""

    def __init__(self) -> None:
        self.results: list[WindowResult] = []

    def add(self, outcome: Outcome) -> None:
        assert isinstance(outcome.record, WindowResult)
        self.results.append(outcome.record)


class Fresh:
    """Redis: no window was emitted before."""

    async def windows_final(self, ids: list[str]) -> list[bool]:
        return [False] * len(ids)


def stream(panes: int, per_pane: int, slide_ms: int, tokens: Callable[[str], int]) -> list[WindowItem]:
    """Texts with their token counts, as the event handler makes them (fold rules are counted in tokens)."""
    texts = [f"{SUBJECTS[i % len(SUBJECTS)]} {UPDATES[(i * 5 + i // 7) % len(UPDATES)]}"
             for i in range(panes * per_pane)]
    items = [WindowItem(text, T0 + i * slide_ms // per_pane, "station", tokens(text)) for i, text in enumerate(texts)]
    return [*items, WindowItem("flush", T0 + (panes + 100) * slide_ms, "flush", 1)]


async def run(plan: str, route: Route, pool: Backend, items: list[WindowItem]) -> Run:
    writer, tracker = Collected(), OffsetTracker()
    stage = WindowStage(route, pool, writer, tracker, Fresh(), Sealer(10_000_000, "dlq"))  # type: ignore[arg-type]
    stage.watermarks.assign([TOPIC], now_ms=0)
    for offset, item in enumerate(items):
        ref = tracker.track(TOPIC, offset)
        assert stage.add(item, ref, now_ms=1)
        tracker.done(ref)
    start = time.perf_counter()
    stage.tick(now_ms=2)
    await stage.drain()
    elapsed_s = time.perf_counter() - start
    if stage.failure is not None:
        raise stage.failure
    results = sorted(writer.results, key=lambda r: r.window.start)
    return Run(plan, len(results), stage.model_calls, stage.prompt_tokens, elapsed_s, results)


def route(panes: bool, args: argparse.Namespace) -> Route:
    return Route.model_validate({"name": "panes" if panes else "plain", "input": TOPIC[0], "task": "none",
                                 "window": {"kind": "sliding", "size_ms": args.ratio * args.slide_ms,
                                            "slide_ms": args.slide_ms, "task": "summarize",
                                            "summary_tokens": args.summary_tokens, "panes": panes,
                                            "output": "out"}})


async def main_async(args: argparse.Namespace) -> list[Run]:
    settings = Settings()
    worker = load_worker(ModelSettings())
    pool = resident(worker, settings)
    await pool.start()
    items = stream(args.panes, args.per_pane, args.slide_ms, pool.count_tokens)
    try:
        await run("warm-up", route(True, args), pool, stream(2, 2, args.slide_ms, pool.count_tokens))
        return [await run("plain", route(False, args), pool, items),
                await run("paned", route(True, args), pool, items)]
    finally:
        await pool.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--panes", type=int, default=16, help="slide-long panes with events")
    parser.add_argument("--per-pane", type=int, default=20, help="messages per pane")
    parser.add_argument("--slide-ms", type=int, default=10_000)
    parser.add_argument("--ratio", type=int, default=6, help="window size / slide")
    parser.add_argument("--summary-tokens", type=int, default=32)
    parser.add_argument("--json", help="write both plans' window results here")
    args = parser.parse_args()
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"# sliding {args.ratio * args.slide_ms} ms / {args.slide_ms} ms (S/s = {args.ratio}), "
          f"{args.panes} panes x {args.per_pane} messages, summary_tokens {args.summary_tokens}")
    plain, paned = asyncio.run(main_async(args))
    print(f"{'plan':6} {'windows':>7} {'calls':>5} {'prompt tok':>10} {'tok/window':>10} {'s':>7} {'windows/s':>9}")
    for r in (plain, paned):
        print(f"{r.plan:6} {r.windows:7d} {r.calls:5d} {r.prompt_tokens:10d} {r.tokens_per_window:10.1f} "
              f"{r.elapsed_s:7.1f} {r.windows_per_s:9.3f}")
    print(f"prompt tokens per window result: {plain.tokens_per_window / paned.tokens_per_window:.2f}x fewer; "
          f"window results/s: {paned.windows_per_s / plain.windows_per_s:.2f}x")
    if args.json:
        rows: list[dict[str, Any]] = [
            {"start": a.window.start - T0, "end": a.window.end - T0, "count": a.count,
             "plain": a.summary, "paned": b.summary}
            for a, b in zip(plain.results, paned.results, strict=True)]
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
