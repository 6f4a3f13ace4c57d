"""The engine against plain `transformers.generate`, side by side on one Poisson stream of mixed requests.

    .venv/bin/python -m bench.engine [--requests 512] [--rate 2] [--one-by-one 8]
    .venv/bin/python -m bench.engine --config bench/configs/llama-3.2-1b.json --device cuda   # random weights

Requests have prompts of 16-512 tokens and answers of 8-256 tokens (uniform, seeded; EOS ignored so
every answer has its forced length), and arrive as a Poisson stream at --rate per second. Systems:
  (a) one-by-one `generate`, run back to back on the first --one-by-one requests (its throughput only:
      under the stream's arrival rate its queue would grow without bound);
  (b) static padded batches of `generate`: whatever has arrived, up to --batch, left-padded, run until
      its longest answer is done (the slice's worker);
  (c) the continuous-batching engine (streamer.engine.engine) with its defaults.
Prompts are token ids, so a model with random weights of a real architecture (no tokenizer) works too.
Prints output tokens/s, requests/s, p50/p99 time to first token and end-to-end latency, SLO misses,
and the ratios; --json writes the same figures to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, StoppingCriteria, StoppingCriteriaList

from streamer.engine.engine import Engine, EngineConfig, TokenRequest


@dataclass(frozen=True)
class Job:
    arrival_s: float
    prompt: list[int]
    new_tokens: int


@dataclass
class Done:
    job: Job
    first_token_s: float
    done_s: float


@dataclass(frozen=True)
class Figures:
    system: str
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p99_s: float | None
    slo_misses: int | None


def workload(n: int, rate: float, vocab: int, seed: int, prompt_range: tuple[int, int],
             answer_range: tuple[int, int]) -> list[Job]:
    rng = random.Random(seed)
    jobs, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(*prompt_range))]
        jobs.append(Job(t, prompt, rng.randint(*answer_range)))
    return jobs


def one_by_one(model: PreTrainedModel, jobs: list[Job]) -> Figures:
    device = next(model.parameters()).device
    started = time.perf_counter()
    tokens = 0
    for job in jobs:
        ids = torch.tensor([job.prompt], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job.new_tokens,
                             min_new_tokens=job.new_tokens, do_sample=False, pad_token_id=0)
        tokens += out.shape[1] - ids.shape[1]
    _sync(device)
    seconds = time.perf_counter() - started
    return Figures("(a) one-by-one generate", len(jobs), tokens, seconds, tokens / seconds, len(jobs) / seconds,
                   None, None, None, None, None)


class _FirstStep(StoppingCriteria):
    """Records when the batch's first token was sampled; never stops generation."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def static_batches(model: PreTrainedModel, jobs: list[Job], batch: int) -> list[Done]:
    """Arrived requests, up to `batch`, left-padded and run until the longest answer is complete."""
    device = next(model.parameters()).device
    done: list[Done] = []
    pending = list(jobs)
    t0 = time.perf_counter()
    while pending:
        now = time.perf_counter() - t0
        if pending[0].arrival_s > now:
            time.sleep(pending[0].arrival_s - now)
            continue
        group = [j for j in pending[:batch] if j.arrival_s <= now]
        pending = pending[len(group):]
        width = max(len(j.prompt) for j in group)
        ids = torch.tensor([[0] * (width - len(j.prompt)) + j.prompt for j in group], device=device)
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in group], device=device)
        longest = max(j.new_tokens for j in group)
        first = _FirstStep()
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                       pad_token_id=0, stopping_criteria=StoppingCriteriaList([first]))
        _sync(device)
        end = time.perf_counter() - t0
        first_s = (first.at or time.perf_counter()) - t0
        done.extend(Done(j, first_s, end) for j in group)
    return done


def engine_run(model: PreTrainedModel, jobs: list[Job], config: EngineConfig, slo_s: float) -> list[Done]:
    engine = Engine(model, config, end_ids=frozenset())
    device = next(model.parameters()).device
    pending = list(enumerate(jobs))
    done: list[Done] = []
    t0 = time.perf_counter()
    first: dict[int, float] = {}
    engine.on_token = lambda key, _: first.setdefault(key, time.perf_counter() - t0)  # type: ignore[arg-type]
    while pending or not engine.idle:
        now = time.perf_counter() - t0
        while pending and pending[0][1].arrival_s <= now:
            i, job = pending.pop(0)
            engine.add(i, TokenRequest(tuple(job.prompt), job.new_tokens), t0 + job.arrival_s + slo_s)
        if engine.idle:
            time.sleep(max(0.0, pending[0][1].arrival_s - now))
            continue
        for f in engine.step():
            _sync(device)
            done.append(Done(jobs[f.key], first[f.key], time.perf_counter() - t0))  # type: ignore[index]
    return done


def figures(system: str, done: list[Done], slo_s: float) -> Figures:
    tokens = sum(d.job.new_tokens for d in done)
    start = min(d.job.arrival_s for d in done)
    seconds = max(d.done_s for d in done) - start
    ttft = [d.first_token_s - d.job.arrival_s for d in done]
    e2e = [d.done_s - d.job.arrival_s for d in done]
    return Figures(system, len(done), tokens, seconds, tokens / seconds, len(done) / seconds,
                   _pct(ttft, 50), _pct(ttft, 99), _pct(e2e, 50), _pct(e2e, 99), sum(e > slo_s for e in e2e))


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(config_path: str | None, device: str, dtype: str) -> PreTrainedModel:
    """The real default model, or random weights of the architecture in `config_path`."""
    torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if config_path is None:
        from streamer.models.loader import load_model

        return load_model(None, device=device, dtype=dtype).model
    config = AutoConfig.for_model(**json.loads(Path(config_path).read_text()))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype or torch.bfloat16)
    return model.eval()


def table(rows: list[Figures]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [f"{'system':<30}{'req':>5}{'tok/s':>9}{'req/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
             f"{'e2e p50':>9}{'e2e p99':>9}{'SLO miss':>9}"]
    for r in rows:
        lines.append(f"{r.system:<30}{r.requests:>5}{r.tokens_per_s:>9.1f}{r.requests_per_s:>8.2f}"
                     f"{f(r.ttft_p50_s, '.2f'):>10}{f(r.ttft_p99_s, '.2f'):>10}{f(r.e2e_p50_s, '.2f'):>9}"
                     f"{f(r.e2e_p99_s, '.2f'):>9}{f(r.slo_misses, 'd'):>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Figures]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    parser.add_argument("--one-by-one", type=int, default=8, help="requests for (a); 0 skips it")
    parser.add_argument("--batch", type=int, default=16, help="(b)'s batch size (the static pool's default)")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(16, 512))
    parser.add_argument("--answer-tokens", type=int, nargs=2, default=(8, 256))
    parser.add_argument("--slo-s", type=float, default=60.0, help="end-to-end latency counted as an SLO miss")
    parser.add_argument("--config", default=None, help="an architecture's config.json: random weights of that shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--kv-blocks", type=int, default=2048)
    parser.add_argument("--max-running", type=int, default=EngineConfig.max_running)
    parser.add_argument("--max-step-tokens", type=int, default=EngineConfig.max_step_tokens)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--skip-static", action="store_true")
    args = parser.parse_args(argv)

    model = load(args.config, args.device, args.dtype)
    name = args.config or "SmolLM2-135M-Instruct (real weights)"
    jobs = workload(args.requests, args.rate, min(model.config.vocab_size, 49152), 7,
                    tuple(args.prompt_tokens), tuple(args.answer_tokens))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {args.device}, dtype {model.dtype}")
    print(f"model: {name}; {len(jobs)} requests, prompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens, "
          f"answers {args.answer_tokens[0]}-{args.answer_tokens[1]} tokens (EOS ignored), Poisson {args.rate}/s")
    config = EngineConfig(num_blocks=args.kv_blocks, max_running=args.max_running,
                          max_step_tokens=args.max_step_tokens)
    warm = workload(4, 100.0, 1000, 1, (8, 16), (2, 4))  # kernels and allocator ready before timing
    engine_run(model, warm, config, args.slo_s)
    static_batches(model, warm, args.batch)
    rows: list[Figures] = []
    runs: list[tuple[str, Callable[[], list[Done]]]] = [
        ("(c) continuous engine", lambda: engine_run(model, jobs, config, args.slo_s))]
    if not args.skip_static:
        runs.append((f"(b) static batches of {args.batch}", lambda: static_batches(model, jobs, args.batch)))
    for system, run in runs:
        rows.append(figures(system, run(), args.slo_s))
        print(table(rows[-1:]).splitlines()[1], flush=True)
    if args.one_by_one:
        rows.append(one_by_one(model, jobs[: args.one_by_one]))
    rows.sort(key=lambda r: r.system)
    print(table(rows))
    by = {r.system[:3]: r for r in rows}
    if "(b)" in by:
        b, c = by["(b)"], by["(c)"]
        print(f"(c)/(b) output tokens/s: {c.tokens_per_s / b.tokens_per_s:.2f}x; "
              f"e2e p99 {c.e2e_p99_s:.1f}s vs {b.e2e_p99_s:.1f}s")
    if "(a)" in by:
        print(f"(c)/(a) output tokens/s: {by['(c)'].tokens_per_s / by['(a)'].tokens_per_s:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
