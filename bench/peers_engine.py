"""The native continuous engine vs llama.cpp's llama-server on the same GGUF weights, each through its
own OpenAI API (`/v1/chat/completions`), at several concurrencies; then where a native decode step's time goes.

    .venv/bin/python -m bench.peers_engine [--quick] [--concurrency 1 16 48] [--rounds 2]
        [--int8 /tmp/peers-smol-int8]  # also serve an int8-dynamic artifact, made in about 2 min by
    .venv/bin/streamer compress --recipe int8-dynamic --out /tmp/peers-smol-int8 --eval-prompts 20
        [--part peers|profile|all]     # profile: the in-process step profile only

The `peers` part is `run_peers(Options(...))`: it prints its tables and returns its `Figures` (per
concurrency and side, tokens/s mean, min, max and the ratio to llama-server's mean); bench/peers.py
calls it for issue 19's one side-by-side run, next to bench/peers_windows.py's `run_peers`.

peers    llama-server (ops/llama/llama.sh: `-np 16` slots, `--threads $(nproc)`, ctx 8192, the default GGUF
         `streamer.models.default.default_gguf()`, Q4_1) and `streamer serve` (the native continuous engine
         over the fp32 weights de-quantized from that GGUF; with --int8 a second `streamer serve` on the
         artifact), all started once and left resident. One aiohttp client sends the same requests to each:
         a fixed set of chat prompts of mixed lengths (examples/questions.jsonl, review summaries from
         tests/integration/data/reviews.jsonl, and long prompts of several reviews), max_tokens cycling
         16/32/48/64, temperature 0 (greedy), answers ending at EOS or max_tokens. Per concurrency the
         sides run in A/B/A order (llama, streamer[, int8], llama, streamer[, int8], ..., llama), so
         drift on this shared machine shows as the spread of the llama runs. The same prompts repeat run
         after run, so both servers' prompt caches (llama's per slot, streamer's prefix blocks) are warm
         after the first; `prompt eval` is llama's over the prompt tokens it did not find cached (its
         `prompt_ms` runs while other slots decode, so it is a latency, not a cost). Each run reports completion
         tokens (the servers' `usage`), wall seconds, tokens/s; the ratio is a side's mean tokens/s over
         llama's mean. llama's `timings.predicted_per_token_ms` (median over a run's requests) is its
         per-token time within the batch, so comparable with a native decode step.
         Quality: the concurrency-1 answers of both engines, tokenized by llama-server's /tokenize,
         compared prompt by prompt (same first N tokens, same whole answer). The models differ: llama.cpp
         computes on the Q4_1 blocks, streamer on fp32 weights de-quantized from them (and int8-dynamic
         re-quantizes those), so greedy paths may part after a near tie.
profile  the native engine in this process (`load_worker` + `build.resident` as `streamer serve` builds it),
         closed loop at `--profile-concurrency` requests (a new one joins as one finishes, like the
         client), the same prompts: first `Engine.step` called here (engine alone), then the same
         requests through the started `ContinuousPool` (asyncio callers, its engine thread; no HTTP),
         then pure decode steps at `--profile-batches` rows, then the timed run. `time.perf_counter`
         wrappers, patched onto this process's objects only, time each step
         by phase: schedule, rows, the forward (`PagedRunner.step`, split into step inputs, embedding,
         norms, q/k/v projections, RoPE, KV gather, attention, o_proj, MLP, head), sampling, complete,
         settle. Steps are split into pure-decode steps and steps with prompt chunks.
         `--profile-model` profiles an artifact instead of the GGUF.

Measured (2 shared CPUs, AVX-512, torch 2.15; load 1.1-3.2, see the runs): tokens/s over llama-server's,
c=1 / 16 / 48: fp32 0.14x / 0.53x / 0.90x, int8-dynamic 0.25x / 1.02x / 1.46x. A pure decode step at 1 /
16 rows: llama 7.8 / 67.8 ms, fp32 53.6 / 111.7 ms, int8 19.1 / 44.7 ms. The engine's own Python
(schedule, rows, sample, complete, settle) is under 1% of a step; fp32 GEMMs are ~78% (MLP 43%, head 18%).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from streamer.state.server import free_port
from tests.integration.services import llama_service

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = (16, 32, 48, 64)
LLAMA_SLOTS = 16


# --- the prompts ------------------------------------------------------------------------------------


def prompts() -> list[list[dict[str, str]]]:
    """96 chats of mixed length: 24 short questions, 56 single-review summaries, 16 of three reviews each.
    Interleaved so that any prefix of the list mixes the three kinds."""
    questions = [json.loads(line)["text"] for line in (ROOT / "examples" / "questions.jsonl").read_text().splitlines()
                 if line.strip()]
    reviews = [json.loads(line)["text"] for line in
               (ROOT / "tests" / "integration" / "data" / "reviews.jsonl").read_text().splitlines() if line.strip()]
    medium = [f"Summarize this customer review in one sentence and say whether it is positive: {r}" for r in reviews]
    long = [("Here are three customer reviews.\n" + "\n".join(f"- {reviews[(3 * i + j) % len(reviews)]}"
                                                               for j in range(3))
             + "\nWrite a short paragraph for the shop owner: what customers like, what they dislike, "
               "and one thing to fix first.") for i in range(16)]
    kinds = [collections.deque(questions), collections.deque(medium), collections.deque(long)]
    mixed: list[str] = []
    while any(kinds):
        for kind in kinds:  # 3 medium : 1 short : ~0.5 long, in turn
            if kind:
                mixed.append(kind.popleft())
    return [[{"role": "user", "content": text}] for text in mixed]


def max_tokens(i: int) -> int:
    return MAX_TOKENS[i % len(MAX_TOKENS)]


def requests_for(concurrency: int, quick: bool) -> int:
    if concurrency == 1:
        return 8 if quick else 12
    return min(96, max(48, 2 * concurrency))


# --- the servers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def streamer_serve(run_dir: Path, name: str, model_path: Path | None, own_process: bool) -> Iterator[str]:
    """`streamer serve` on a free port (native continuous engine on CPU, in a process of its own where
    `own_process`), the model at `model_path` (None: the default GGUF); yields its base URL (.../v1) once
    /v1/models answers."""
    port = free_port()
    config = run_dir / f"{name}.yaml"
    model = {"device": "cpu", **({"path": str(model_path)} if model_path else {})}
    engine = {"kind": "continuous", "own_process": own_process}
    config.write_text(json.dumps({"model": model, "engine": engine}))  # JSON is YAML
    log = (run_dir / f"{name}.log").open("w")
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "streamer"), "serve", "-c", str(config), "--port", str(port),
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, cwd=run_dir)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamer serve ({name}) exited {proc.returncode}: "
                                   f"{(run_dir / f'{name}.log').read_text()[-2000:]}")
            try:
                import urllib.request

                with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamer serve ({name}) not ready after 300 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --- the client -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What the `peers` part measures."""

    concurrency: tuple[int, ...] = (1, 16, 48)
    rounds: int = 2  # A/B rounds per concurrency, then a last A
    quick: bool = False  # 8 requests at concurrency 1 instead of 12
    int8: Path | None = None  # an int8-dynamic artifact served too, as side "int8"
    own_process: bool = True  # streamer's engine in a process of its own (`engine.own_process`), else in-process


@dataclass(frozen=True)
class Rate:
    """One side's tokens/s at one concurrency over its runs, and its mean over llama-server's mean."""

    mean: float
    low: float
    high: float
    ratio: float  # 1.0 for llama itself


@dataclass
class Figures:
    """What the `peers` part measured. rates[concurrency][side], sides "llama", "streamer" (fp32 de-quantized
    from the GGUF) and, with an int8 artifact, "int8"."""

    rates: dict[int, dict[str, Rate]]
    llama_step_ms: dict[int, float]  # llama-server's decode step (ms) at that many rows
    runs: list[Run]


@dataclass
class Run:
    side: str
    concurrency: int
    round: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    load_before: float
    texts: list[str] = field(default_factory=list)
    per_token_ms: list[float] = field(default_factory=list)  # llama's timings.predicted_per_token_ms
    prompt_ms: float = 0.0  # llama's timings: prompt evaluation (tokens not found in the slot's cache)
    prompt_n: int = 0

    @property
    def rate(self) -> float:
        return self.completion_tokens / self.seconds


def load1() -> float:
    return os.getloadavg()[0]


async def drive(http: aiohttp.ClientSession, base_url: str, chats: Sequence[list[dict[str, str]]],
                concurrency: int, extra: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], float]:
    """Every chat once, at most `concurrency` in flight; (responses in chat order, wall seconds)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> dict[str, Any]:
        body = {"model": "smollm2", "messages": chats[i], "max_tokens": max_tokens(i), "temperature": 0,
                **(extra or {})}
        async with gate, http.post(f"{base_url}/chat/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"{base_url}: HTTP {response.status}: {await response.text()}")
            data: dict[str, Any] = await response.json()
            return data

    started = time.perf_counter()
    answers = await asyncio.gather(*(one(i) for i in range(len(chats))))
    return list(answers), time.perf_counter() - started


async def measure(http: aiohttp.ClientSession, side: str, base_url: str, chats: Sequence[list[dict[str, str]]],
                  concurrency: int, rnd: int) -> Run:
    before = load1()
    answers, seconds = await drive(http, base_url, chats, concurrency)
    run = Run(side, concurrency, rnd, len(chats), sum(a["usage"]["prompt_tokens"] for a in answers),
              sum(a["usage"]["completion_tokens"] for a in answers), seconds, before,
              [a["choices"][0]["message"]["content"] for a in answers],
              [a["timings"]["predicted_per_token_ms"] for a in answers
               if a.get("timings", {}).get("predicted_n", 0) > 1],
              sum(a.get("timings", {}).get("prompt_ms", 0.0) for a in answers),
              sum(a.get("timings", {}).get("prompt_n", 0) for a in answers))
    ptm = f"{statistics.median(run.per_token_ms):8.1f}" if run.per_token_ms else f"{'':8s}"
    print(f"{concurrency:>4} {side:<9} {rnd:>3} {run.requests:>5} {run.prompt_tokens:>7} {run.completion_tokens:>7} "
          f"{seconds:>7.2f} {run.rate:>8.1f} {ptm} {before:>6.2f}", flush=True)
    return run


async def tokenize(http: aiohttp.ClientSession, llama_root: str, text: str) -> list[int]:
    async with http.post(f"{llama_root}/tokenize", json={"content": text}) as response:
        response.raise_for_status()
        return list((await response.json())["tokens"])


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def agreement(http: aiohttp.ClientSession, llama_root: str, ref: Run, other: Run) -> str:
    """How far `other`'s answers follow `ref`'s, prompt by prompt, in llama's tokens."""
    pairs = [(await tokenize(http, llama_root, a), await tokenize(http, llama_root, b))
             for a, b in zip(ref.texts, other.texts, strict=True)]
    n = len(pairs)
    same = {k: sum(common_prefix(a, b) >= min(k, len(a), len(b)) for a, b in pairs) / n for k in (4, 8, 16)}
    whole = sum(a == b for a, b in pairs) / n
    words = sum(common_prefix(x.split(), y.split()) >= min(8, len(x.split()), len(y.split()))
                for x, y in zip(ref.texts, other.texts, strict=True)) / n
    prefix = statistics.mean(common_prefix(a, b) for a, b in pairs)
    return (f"{other.side:>9} vs {ref.side:<9} same first 4/8/16 tokens {same[4]:.0%}/{same[8]:.0%}/{same[16]:.0%}, "
            f"first 8 words {words:.0%}, whole answer {whole:.0%}; mean common prefix {prefix:.1f} tokens "
            f"({n} prompts)")


async def peers(options: Options, sides: dict[str, str], llama_root: str) -> Figures:
    chats = prompts()
    names = list(sides)
    order = [s for _ in range(options.rounds) for s in names] + ["llama"]  # A/B(/C)/A/B(/C)/A
    figures = Figures({}, {}, [])
    runs = figures.runs
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        for url in sides.values():  # warm each: first parse, caches, threads
            await drive(http, url, chats[:4], 4)
        print(f"{'conc':>4} {'side':<9} {'rnd':>3} {'reqs':>5} {'prompt':>7} {'compl':>7} {'wall s':>7} "
              f"{'tok/s':>8} {'ms/tok':>8} {'load1':>6}")
        for concurrency in options.concurrency:
            batch = chats[: requests_for(concurrency, options.quick)]
            seen: collections.Counter[str] = collections.Counter()
            for side in order:
                seen[side] += 1
                runs.append(await measure(http, side, sides[side], batch, concurrency, seen[side]))
        print("\nper concurrency: mean tokens/s of each side's runs (min-max), ratio to llama's mean")
        for concurrency in options.concurrency:
            mine = [r for r in runs if r.concurrency == concurrency]
            base = statistics.mean(r.rate for r in mine if r.side == "llama")
            parts = []
            for side in names:
                rates = [r.rate for r in mine if r.side == side]
                rate = Rate(statistics.mean(rates), min(rates), max(rates), statistics.mean(rates) / base)
                figures.rates.setdefault(concurrency, {})[side] = rate
                ratio = "" if side == "llama" else f" = {rate.ratio:.2f}x"
                parts.append(f"{side} {rate.mean:.1f} ({rate.low:.1f}-{rate.high:.1f}){ratio}")
            ptm = [p for r in mine if r.side == "llama" for p in r.per_token_ms]
            note = f"; llama ms/token in batch (median) {statistics.median(ptm):.1f}" if ptm else ""
            pn = sum(r.prompt_n for r in mine if r.side == "llama")
            if pn:
                pms = sum(r.prompt_ms for r in mine if r.side == "llama")
                note += f", prompt eval {pms / pn:.2f} ms/token over {pn} uncached prompt tokens"
            print(f"  c={concurrency:<3} " + ", ".join(parts) + note)
        print("\nllama-server decode alone (64 tokens each, ignore_eos, as many requests as rows): median "
              "timings.predicted_per_token_ms, i.e. its step time at that many rows")
        for rows in (1, LLAMA_SLOTS):
            answers, _ = await drive(http, sides["llama"], chats[:rows], rows, {"max_tokens": 64, "ignore_eos": True})
            ms = statistics.median(a["timings"]["predicted_per_token_ms"] for a in answers)
            figures.llama_step_ms[rows] = ms
            print(f"  {rows:>3} rows: {ms:7.1f} ms/step {ms / rows:6.2f} ms/row")
        if 1 in options.concurrency:
            ones = {side: [r for r in runs if r.concurrency == 1 and r.side == side] for side in names}
            print("\ngreedy agreement at concurrency 1 (llama.cpp: Q4_1 blocks; streamer: fp32 de-quantized from "
                  "them; int8: int8-dynamic of that fp32)")
            if len(ones["llama"]) > 1:
                print("  " + await agreement(http, llama_root, ones["llama"][0], ones["llama"][-1]))
            for side in names[1:]:
                print("  " + await agreement(http, llama_root, ones["llama"][0], ones[side][0]))
            if "int8" in ones:
                print("  " + await agreement(http, llama_root, ones["streamer"][0], ones["int8"][0]))
            for i in range(min(3, len(ones["llama"][0].texts))):
                for side in names:
                    print(f"  [{i}] {side:<9} {ones[side][0].texts[i][:110]!r}")
    return figures


def run_peers(options: Options) -> Figures:
    """The `peers` part: starts llama-server and `streamer serve` (and the int8 one), prints its tables,
    stops them; returns the figures."""
    parallel = os.environ.get("LLAMA_PARALLEL")
    os.environ["LLAMA_PARALLEL"] = str(LLAMA_SLOTS)
    with contextlib.ExitStack() as stack:
        if parallel is None:
            stack.callback(os.environ.pop, "LLAMA_PARALLEL", None)
        else:
            stack.callback(os.environ.__setitem__, "LLAMA_PARALLEL", parallel)
        run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peers-engine-")))
        started = time.perf_counter()
        llama = stack.enter_context(llama_service(run_dir / "llama"))
        sides = {"llama": llama.base_url,
                 "streamer": stack.enter_context(streamer_serve(run_dir, "streamer", None, options.own_process))}
        if options.int8:
            sides["int8"] = stack.enter_context(streamer_serve(run_dir, "int8", options.int8, options.own_process))
        where = "engine.own_process" if options.own_process else "engine in-process"
        print(f"servers up in {time.perf_counter() - started:.0f} s: llama-server {LLAMA_SLOTS} slots, "
              f"{os.cpu_count()} threads; streamer serve (continuous, cpu, {where})"
              + (f"; int8 {options.int8}" if options.int8 else ""), flush=True)
        return asyncio.run(peers(options, sides, llama.base_url.removesuffix("/v1")))


# --- the step profile -------------------------------------------------------------------------------


class Phases:
    """Seconds per phase name within the current step, and the finished steps' records."""

    def __init__(self) -> None:
        self.current: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.steps: list[tuple[dict[str, float], int, int]] = []  # (phases, decode rows, prompt tokens)
        self.stack: list[str] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn, its time added to `name` (exclusive of the phases timed inside it)."""

        @functools.wraps(fn)
        def timed(*a: Any, **kw: Any) -> Any:
            self.stack.append(name)
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent = time.perf_counter() - started
                self.stack.pop()
                self.current[name] += spent
                if self.stack:  # exclusive times: take it off the enclosing phase
                    self.current[self.stack[-1]] -= spent

        return timed


def instrument(engine: Any, phases: Phases) -> None:
    """Patch timers onto this engine's objects (and the paged module's globals), in this process only."""
    from streamer.engine import paged

    engine.scheduler.schedule = phases.wrap("schedule", engine.scheduler.schedule)
    engine.scheduler.complete = phases.wrap("complete", engine.scheduler.complete)
    engine._row = phases.wrap("rows", engine._row)
    engine._sample = phases.wrap("sample", engine._sample)
    engine._settle = phases.wrap("settle", engine._settle)
    engine.runner.step = phases.wrap("forward: other (layer loop, adds, .float)", engine.runner.step)
    engine.runner._attention = phases.wrap("attn: other (cache write, views, copies)", engine.runner._attention)
    paged.StepInputs = phases.wrap("forward: step inputs", paged.StepInputs)
    paged._gather = phases.wrap("attn: KV gather", paged._gather)
    paged.apply_rotary_pos_emb = phases.wrap("attn: RoPE", paged.apply_rotary_pos_emb)
    paged.F = type("F", (), {"scaled_dot_product_attention": staticmethod(
        phases.wrap("attn: sdpa", paged.F.scaled_dot_product_attention))})
    body = engine.runner.model.model
    body.embed_tokens.forward = phases.wrap("forward: embed", body.embed_tokens.forward)
    body.rotary_emb.forward = phases.wrap("forward: rotary tables", body.rotary_emb.forward)
    body.norm.forward = phases.wrap("norms", body.norm.forward)
    head = engine.runner.model.lm_head
    head.forward = phases.wrap("lm_head", head.forward)
    for layer in body.layers:
        attn = layer.self_attn
        for proj in ("q_proj", "k_proj", "v_proj"):
            module = getattr(attn, proj)
            module.forward = phases.wrap("attn: q/k/v proj", module.forward)
        attn.o_proj.forward = phases.wrap("attn: o_proj", attn.o_proj.forward)
        layer.mlp.forward = phases.wrap("mlp", layer.mlp.forward)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.forward = phases.wrap("norms", norm.forward)


def run_profile(args: argparse.Namespace) -> None:
    import torch

    from streamer.config import ModelSettings, Settings
    from streamer.engine.build import resident
    from streamer.engine.engine import Engine, TokenRequest
    from streamer.engine.load import load_worker
    from streamer.engine.requests import GenRequest, GenResult

    model = ModelSettings(device="cpu", **({"path": args.profile_model} if args.profile_model else {}))
    worker = load_worker(model)
    pool = resident(worker, Settings(model=model, engine={"kind": "continuous"}))
    engine: Engine = pool.engine  # type: ignore[attr-defined]
    engine.on_token = None
    ids = worker.prompt_ids(prompts())
    concurrency = args.profile_concurrency
    shape = [(0, 0)]  # the last plan's (decode rows, prompt tokens)
    schedule = engine.scheduler.schedule

    def shaped() -> Any:
        plan = schedule()
        decode = sum(1 for c in plan.chunks if c.end - c.start == 1)
        shape[0] = (decode, plan.tokens - decode)
        return plan

    engine.scheduler.schedule = shaped

    def request(i: int, new_tokens: int | None = None) -> TokenRequest:
        return TokenRequest(tuple(ids[i % len(ids)]), new_tokens or max_tokens(i), 0.0,
                            frozenset() if new_tokens else worker.eos_ids)

    def closed_loop(count: int, timed: Phases | None) -> tuple[int, float, int]:
        """Run `count` requests, `concurrency` at a time; (tokens generated, seconds, steps)."""
        next_i, live, generated, steps = 0, 0, 0, 0
        started = time.perf_counter()
        while next_i < count or live:
            while live < concurrency and next_i < count:
                assert engine.add(next_i, request(next_i), time.monotonic() + 600) is None
                next_i, live = next_i + 1, live + 1
            if timed is not None:
                timed.current.clear()
            step_started = time.perf_counter()
            done = engine.step()
            if timed is not None:
                timed.current["step (total)"] = time.perf_counter() - step_started
                timed.steps.append((dict(timed.current), *shape[0]))
            steps += 1
            live -= len(done)
            generated += sum(len(f.tokens) for f in done)
        return generated, time.perf_counter() - started, steps

    def decode_only(rows: int) -> float:
        """Median ms of a pure decode step of `rows` sequences of ~60-200 cached tokens (64 new tokens each)."""
        for i in range(rows):
            engine.add(("d", rows, i), request(i, 64), time.monotonic() + 600)
        times = []
        while not engine.idle:
            started = time.perf_counter()
            engine.step()
            if shape[0] == (rows, 0):
                times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    async def through_pool(count: int) -> tuple[int, float]:
        """The same requests through the ContinuousPool (engine thread, chat template, text), no HTTP."""
        chats = prompts()
        gate = asyncio.Semaphore(concurrency)
        engine.on_token = pool._token_from_thread  # type: ignore[attr-defined]
        await pool.start()

        async def one(i: int) -> int:
            async with gate:
                done = await pool.generate(GenRequest(tuple(chats[i % len(chats)]), max_tokens(i), 0.0))
                assert isinstance(done.result, GenResult) and done.result.error is None, done.result
                return done.result.tokens_out

        try:
            started = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one(i) for i in range(count))))
            return tokens, time.perf_counter() - started
        finally:
            await pool.aclose()
            engine.on_token = None

    closed_loop(concurrency, None)  # warm
    tokens, seconds, steps = closed_loop(args.profile_requests, None)
    print(f"\nprofile: {worker.name}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.profile_requests} requests, closed loop at {concurrency} in flight, in-process (no HTTP)")
    print(f"  engine alone:       {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tokens/s, {steps} steps, "
          f"{tokens / steps:.1f} tokens/step, {seconds / steps * 1000:.1f} ms/step")
    tokens, seconds = asyncio.run(through_pool(args.profile_requests))
    print(f"  through the pool:   {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tokens/s "
          "(asyncio callers, engine thread; no HTTP)")
    if args.profile_batches:
        steps_ms = {rows: decode_only(rows) for rows in args.profile_batches}
        print("  pure decode step by rows (untimed): "
              + ", ".join(f"{rows} rows {ms:.1f} ms ({ms / rows:.2f} ms/row)" for rows, ms in steps_ms.items()))
    phases = Phases()
    instrument(engine, phases)
    tokens, seconds, steps = closed_loop(args.profile_requests, phases)
    print(f"  timed (by phase):   {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tokens/s, {steps} steps "
          "(the timers' own cost included)")
    for title, keep in (("pure decode steps", lambda d, p: p == 0 and d > 0),
                        ("steps with prompt chunks", lambda d, p: p > 0)):
        chosen = [(ph, d, p) for ph, d, p in phases.steps if keep(d, p)]
        if not chosen:
            continue
        total_s = sum(ph["step (total)"] for ph, _, _ in chosen)
        rows = statistics.mean(d for _, d, _ in chosen)
        prompt = statistics.mean(p for _, _, p in chosen)
        run_s = sum(ph["step (total)"] for ph, _, _ in phases.steps)
        print(f"\n  {title}: {len(chosen)} steps ({total_s:.1f} s, {total_s / run_s:.0%} of all steps' time), "
              f"{total_s / len(chosen) * 1000:.1f} ms/step, "
              f"{rows:.1f} decode rows + {prompt:.0f} prompt tokens per step")
        names: collections.Counter[str] = collections.Counter()
        for ph, _, _ in chosen:
            for name, s in ph.items():
                if name != "step (total)":
                    names[name] += s
        names["step: other (Engine.step itself)"] = total_s - sum(names.values())
        for name, s in sorted(names.items(), key=lambda kv: -kv[1]):
            print(f"    {name:<44} {s / len(chosen) * 1000:8.2f} ms {s / total_s:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 requests at concurrency 1, one round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 48])
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds per concurrency (then a last A)")
    parser.add_argument("--int8", type=Path, default=None, help="an int8-dynamic artifact to serve too")
    parser.add_argument("--in-process", action="store_true",
                        help="streamer's engine on a thread of the server (the default config), not engine.own_process")
    parser.add_argument("--part", choices=("peers", "profile", "all"), default="all")
    parser.add_argument("--profile-model", type=Path, default=None, help="profile this artifact (default: the GGUF)")
    parser.add_argument("--profile-concurrency", type=int, default=16)
    parser.add_argument("--profile-requests", type=int, default=48)
    parser.add_argument("--profile-batches", type=int, nargs="*", default=[1, 16, 32])
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    if args.part in ("peers", "all"):
        run_peers(Options(tuple(args.concurrency), args.rounds, args.quick, args.int8, not args.in_process))
    if args.part in ("profile", "all"):
        run_profile(args)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
