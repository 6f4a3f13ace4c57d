"""Tokens/s of the worker: 16 prompts one by one vs one batch of 16, side by side.

Run: .venv/bin/python bench/generate.py [--device auto] [--new-tokens 32] [--threads N]
EOS is ignored so every request generates exactly --new-tokens tokens in both modes.
"""

import argparse
import os
import platform
import time
from collections.abc import Sequence

import torch

from streamer.engine.requests import GenRequest
from streamer.engine.worker import LLMWorker
from streamer.models.loader import load_model

TOPICS = [
    "the moon", "bread", "rivers", "chess", "volcanoes", "bees", "jazz", "glaciers",
    "libraries", "trains", "tea", "octopuses", "deserts", "bicycles", "lighthouses", "maps",
]  # fmt: skip


def prompts(n: int) -> list[str]:
    """Prompts of varied length, so the batch really needs left padding."""
    return [f"Tell me {'a few facts' if i % 2 else 'one interesting fact'} about {TOPICS[i % len(TOPICS)]}."
            + " Please be detailed." * (i % 4) for i in range(n)]  # fmt: skip


def timed(worker: LLMWorker, batches: Sequence[Sequence[GenRequest]]) -> tuple[float, int]:
    """Seconds and generated tokens for running `batches` in sequence."""
    start = time.perf_counter()
    tokens = sum(r.tokens_out for batch in batches for r in worker.generate(batch))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    loaded = load_model(None, device=args.device)
    worker = LLMWorker(loaded, threads=args.threads)
    worker.warm_up()
    requests = [GenRequest(({"role": "user", "content": p},), args.new_tokens, ignore_eos=True)
                for p in prompts(args.prompts)]  # fmt: skip
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {loaded.device}, dtype {loaded.dtype}")  # fmt: skip
    print(f"model: {worker.name}, {len(requests)} prompts x {args.new_tokens} new tokens (EOS ignored)")
    one_s, one_tok = timed(worker, [[r] for r in requests])
    batch_s, batch_tok = timed(worker, [requests])
    one_rate, batch_rate = one_tok / one_s, batch_tok / batch_s
    print(f"{'mode':<14}{'seconds':>10}{'tokens':>8}{'tokens/s':>10}")
    print(f"{'one-by-one':<14}{one_s:>10.2f}{one_tok:>8}{one_rate:>10.1f}")
    print(f"{'batch of ' + str(len(requests)):<14}{batch_s:>10.2f}{batch_tok:>8}{batch_rate:>10.1f}")
    print(f"batch / one-by-one: {batch_rate / one_rate:.2f}x")


if __name__ == "__main__":
    main()
