"""Extraction under the schema's grammar vs free generation of the same prompts: tokens/s at batch 1 and 16.

    .venv/bin/python -m bench.extract [--quick] [--messages 48] [--batch1-messages 8] [--max-new-tokens 64]

The real default model (SmolLM2-135M-Instruct) through the service's model pool (the continuous engine,
`streamer.engine.build.resident`). Prompts: the `text` of every message in tests/data/support_messages.jsonl,
as an `extract` route sends them (`streamer.tasks.prompts.extract_messages`, the schema's fields listed, no
route system prompt). Schema: examples/schemas/support_ticket.json. Greedy, up to `--max-new-tokens`.

  constrained: GenRequest(schema=the schema's canonical text): every step masks what its grammar forbids;
  free:        the same prompts, schema=None (the model writes what it likes, and stops at EOS or the cap).

Batch 16: waves of 16 requests submitted together, each wave awaited before the next. Batch 1: one request
at a time (over the first `--batch1-messages` messages: it is the slow arm). Every wave (or single message)
runs free, constrained, free, constrained (A/B/A/B), so machine drift hits both modes alike; "round 1" and
"round 2" (the first and second A/B pair) are also shown apart, so drift shows. The engine's prefix cache
would hand every run after a wave's first the prompts the run before it computed, so before each timed run
the same prompts are prefilled untimed (max_new_tokens 1): every timed run starts with its prompts' full
blocks cached, as the shared system prompt (the schema's field list) is in service; "reused" shows it.
Tokens are the answers' kept tokens (`GenResult.tokens_out`: up to the cap, before EOS); free answers run
longer or shorter than constrained ones, so tokens/s is the fair measure and both are printed. Valid: the
answer parses and validates (`ExtractSchema.parse`).

Where the time goes, measured in this process only (the library is wrapped, not changed): every engine step
(its rows, whether all are decode rows, step and model-forward time), `allow_only` (the masking of the
constrained rows, once per step), `Constraint.fill` (one matcher's bitmask) and `Constraint.accept` (one
matcher advanced). The rest of `allow_only` (bitmask allocation, unpackbits, index, masked_fill) is its time
minus fill; a microbenchmark of those tensor operations alone on the engine's shapes splits it further.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import streamer.engine.engine as engine_module
from streamer.config import ModelSettings, Settings
from streamer.engine.build import resident
from streamer.engine.continuous import ContinuousPool
from streamer.engine.grammar import Constraint
from streamer.engine.load import load_worker
from streamer.engine.requests import GenRequest, GenResult
from streamer.errors import StreamerError
from streamer.tasks.prompts import extract_messages
from streamer.tasks.schemas import ExtractSchema

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = ROOT / "tests" / "data" / "support_messages.jsonl"
SCHEMA = ROOT / "examples" / "schemas" / "support_ticket.json"
MODES = ("free", "constrained", "free", "constrained")
Key = tuple[str, int, int]  # mode, batch, round (1 or 2)


@dataclass
class Step:
    rows: int
    decode_only: bool
    step_s: float
    forward_s: float
    mask_s: float = 0.0
    fill_s: float = 0.0
    accept_s: float = 0.0


class Probe:
    """Timers around the engine's step, forward, masking and matchers; each step is filed under the run now on."""

    def __init__(self, engine: Any) -> None:
        self.key: Key = ("warm-up", 0, 0)
        self.steps: dict[Key, list[Step]] = defaultdict(list)
        self._step: Step | None = None
        step, forward = engine.step, engine.runner.step
        allow, fill, accept = engine_module.allow_only, Constraint.fill, Constraint.accept

        def timed_step() -> Any:
            self._step = Step(0, True, 0.0, 0.0)
            start = time.perf_counter()
            out = step()
            self._step.step_s = time.perf_counter() - start
            if self._step.rows:
                self.steps[self.key].append(self._step)
            return out

        def timed_forward(rows: Any) -> Any:
            start = time.perf_counter()
            out = forward(rows)
            assert self._step is not None
            self._step.forward_s = time.perf_counter() - start
            self._step.rows = len(rows)
            self._step.decode_only = all(r.end - r.start == 1 for r in rows)
            return out

        def timed_allow(rows: torch.Tensor, constrained: Any) -> None:
            start = time.perf_counter()
            allow(rows, constrained)
            assert self._step is not None
            self._step.mask_s += time.perf_counter() - start

        def timed_fill(constraint: Constraint, bitmask: torch.Tensor, row: int) -> None:
            start = time.perf_counter()
            fill(constraint, bitmask, row)
            assert self._step is not None
            self._step.fill_s += time.perf_counter() - start

        def timed_accept(constraint: Constraint, token: int) -> None:
            start = time.perf_counter()
            accept(constraint, token)
            assert self._step is not None
            self._step.accept_s += time.perf_counter() - start

        engine.step = timed_step
        engine.runner.step = timed_forward
        engine_module.allow_only = timed_allow  # type: ignore[assignment]
        Constraint.fill = timed_fill  # type: ignore[method-assign]
        Constraint.accept = timed_accept  # type: ignore[method-assign]


async def wave(pool: ContinuousPool, prompts: list[tuple[dict[str, str], ...]], schema: str | None,
               max_new_tokens: int) -> list[GenResult]:
    """The prompts submitted together; their results once all are done."""
    futures = [pool.submit(GenRequest(p, max_new_tokens, schema=schema)) for p in prompts]
    results = []
    for generated in await asyncio.gather(*futures):
        assert isinstance(generated.result, GenResult)
        if generated.result.error is not None:
            raise RuntimeError(generated.result.error)
        results.append(generated.result)
    return results


def valid(spec: ExtractSchema, text: str) -> bool:
    try:
        spec.parse(text)
    except StreamerError:
        return False
    return True


def tensor_ops(rows: int, vocab: int, repeats: int) -> dict[str, float]:
    """Median µs of allow_only's tensor work past the matchers, on a random half-allowed bitmask."""
    words = (vocab + 31) // 32
    packed = np.random.default_rng(0).integers(-(2**31), 2**31, size=(rows, words)).astype(np.int32)
    logits = torch.randn(rows + 1, vocab)
    index = torch.arange(rows)
    bits = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    forbidden = torch.from_numpy(bits == 0)
    picked = logits[index]
    filled = picked.masked_fill(forbidden, float("-inf"))
    steps: dict[str, Callable[[], Any]] = {
        "zeros": lambda: torch.zeros((rows, words), dtype=torch.int32),
        "unpackbits": lambda: np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")[:, :vocab],
        "==0+from_numpy": lambda: torch.from_numpy(bits == 0),
        "rows[index]": lambda: logits[index],
        "masked_fill": lambda: picked.masked_fill(forbidden, float("-inf")),
        "rows[index]=": lambda: logits.__setitem__(index, filled),
    }
    out = {}
    for name, op in steps.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            op()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times) * 1e6
    return out


async def main_async(args: argparse.Namespace) -> tuple[dict[Key, list[GenResult]], dict[Key, float],
                                                         dict[Key, int], Probe, ExtractSchema, int]:
    spec = ExtractSchema.load(str(SCHEMA))
    schema = json.loads(spec.text)
    texts = [json.loads(line)["text"] for line in MESSAGES.read_text().splitlines() if line.strip()]
    prompts = [extract_messages(text, schema, None) for text in texts[: args.messages]]
    worker = load_worker(ModelSettings())
    pool = resident(worker, Settings(engine={"kind": "continuous", "max_running": 16}, batching={"max_queue": 64}))
    assert isinstance(pool, ContinuousPool), "the continuous engine runs in this process on CPU"
    probe = Probe(pool.engine)
    results: dict[Key, list[GenResult]] = defaultdict(list)
    wall: dict[Key, float] = defaultdict(float)
    reused: dict[Key, int] = defaultdict(int)
    await pool.start()
    try:
        await wave(pool, prompts[:2], spec.text, 8)  # warm up: the grammar's tokenizer tables, the model
        await wave(pool, prompts[:2], None, 8)
        for batch, subset in ((16, prompts), (1, prompts[: args.batch1_messages])):
            for at in range(0, len(subset), batch):
                for n, mode in enumerate(MODES):
                    probe.key = ("warm-up", 0, 0)
                    await wave(pool, subset[at : at + batch], None, 1)  # the same cache state for every run
                    probe.key = key = (mode, batch, 1 + n // 2)
                    before = pool.engine.kv_usage()[2]
                    start = time.perf_counter()
                    results[key] += await wave(pool, subset[at : at + batch], spec.text if mode == "constrained"
                                               else None, args.max_new_tokens)
                    wall[key] += time.perf_counter() - start
                    reused[key] += pool.engine.kv_usage()[2] - before
            done = {mode: sum(wall[mode, batch, r] for r in (1, 2)) for mode in ("free", "constrained")}
            print(f"  batch {batch:2} done: free {done['free']:.1f} s, constrained {done['constrained']:.1f} s",
                  flush=True)
    finally:
        await pool.aclose()
    return results, wall, reused, probe, spec, int(worker.model.config.vocab_size)


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=48, help="messages at batch 16 (of 48)")
    parser.add_argument("--batch1-messages", type=int, default=8, help="messages at batch 1 (the slow arm)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="16 messages at batch 16, 4 at batch 1")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.batch1_messages = 16, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start")
    print(f"# {SCHEMA.relative_to(ROOT)}; {args.messages} messages at batch 16, {args.batch1_messages} at "
          f"batch 1; greedy, max_new_tokens {args.max_new_tokens}; each wave free/constrained/free/constrained")
    results, wall, reused, probe, spec, vocab = asyncio.run(main_async(args))
    print(f"# load average {os.getloadavg()[0]:.1f} at end")

    print("| mode | batch | answers | tokens | wall s | tokens/s | round 1 / round 2 tokens/s | valid "
          "| prompt tokens (reused) | decode steps | rows/decode step | s in decode steps | s in steps with prefill |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rate: dict[tuple[str, int], float] = {}
    for batch in (16, 1):
        for mode in ("free", "constrained"):
            keys = [(mode, batch, r) for r in (1, 2)]
            answers = [res for k in keys for res in results[k]]
            tokens, wall_s = sum(res.tokens_out for res in answers), sum(wall[k] for k in keys)
            rounds = " / ".join(f"{sum(res.tokens_out for res in results[k]) / wall[k]:.1f}" for k in keys)
            ok = sum(valid(spec, res.text) for res in answers)
            decode = [s for k in keys for s in probe.steps[k] if s.decode_only]
            prefill_s = sum(s.step_s for k in keys for s in probe.steps[k] if not s.decode_only)
            rate[mode, batch] = tokens / wall_s
            print(f"| {mode} | {batch} | {len(answers)} | {tokens} | {wall_s:.1f} | {tokens / wall_s:.1f} | {rounds} "
                  f"| {ok}/{len(answers)} ({100 * ok / len(answers):.0f}%) "
                  f"| {sum(res.tokens_in for res in answers)} ({sum(reused[k] for k in keys)}) | {len(decode)} "
                  f"| {statistics.mean(s.rows for s in decode):.1f} | {sum(s.step_s for s in decode):.1f} "
                  f"| {prefill_s:.1f} |")
    for batch in (1, 16):
        ratio = rate["constrained", batch] / rate["free", batch]
        print(f"batch {batch:2}: constrained/free tokens/s = {ratio:.2f}x"
              + (f" (target >= 0.80x: {'met' if ratio >= 0.80 else 'NOT met'})" if batch == 16 else ""))

    print("\nper decode step, median ms (steps whose rows all decode one token; batch 16: full 16-row steps only):")
    print("| mode | batch | steps | step | forward | allow_only | fill (all rows) | allow_only - fill | accept (all) "
          "| step - forward |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in (16, 1):
        for mode in ("free", "constrained"):
            steps = [s for r in (1, 2) for s in probe.steps[mode, batch, r] if s.decode_only and s.rows == batch]
            columns = [[s.step_s for s in steps], [s.forward_s for s in steps], [s.mask_s for s in steps],
                       [s.fill_s for s in steps], [s.mask_s - s.fill_s for s in steps],
                       [s.accept_s for s in steps], [s.step_s - s.forward_s for s in steps]]
            print(f"| {mode} | {batch} | {len(steps)} | " + " | ".join(median_ms(c) for c in columns) + " |")
    constrained = [s for k, v in probe.steps.items() if k[0] == "constrained" for s in v]
    if not any(s.mask_s for s in constrained):
        print("WARNING: allow_only never ran in the constrained runs: the engine did not mask (is "
              "streamer/engine/engine.py's call to it in place?); the constrained figures are free generation")
    total = sum(wall[k] for k in wall if k[0] == "constrained")
    print(f"constrained runs, all steps: allow_only {sum(s.mask_s for s in constrained):.2f} s (fill "
          f"{sum(s.fill_s for s in constrained):.2f} s), accept {sum(s.accept_s for s in constrained):.2f} s, "
          f"forward {sum(s.forward_s for s in constrained):.2f} s of {total:.1f} s wall")
    threads = torch.get_num_threads()
    for n in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        for rows in (1, 16):
            ops = tensor_ops(rows, vocab, 50)
            print(f"allow_only's tensor ops alone, {rows} x {vocab}, {n} thread(s), median µs: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in ops.items()))
    torch.set_num_threads(threads)
    print(f"message 1, free:        {results['free', 16, 1][0].text[:150]!r}")
    print(f"message 1, constrained: {results['constrained', 16, 1][0].text[:150]!r}")


if __name__ == "__main__":
    main()
