"""Chat turns with and without the KV prefix of their conversation, side by side in one run.

    .venv/bin/python -m bench.chat_prefix [--conversations 4] [--turns 5] [--max-new-tokens 48]

The real default model (SmolLM2-135M-Instruct) on the native engine, driven directly (one request at a time,
so batching does not blur the figures). Each turn's messages are the `task: chat` pipeline's own
(`streamer.tasks.chat.chat_messages` over the conversation's `History`): (system, user1, assistant1, ...,
user_n), where assistant_i is the answer text of turn i as the worker returns it (special tokens dropped,
outer whitespace stripped). The conversations' turns are
interleaved (turn 1 of each, then turn 2 ...), so every conversation's blocks live beside the others'.

  with reuse:    one engine for the whole run; each request carries its conversation as `session`, so its
                 last turn's prompt and answer blocks are pinned and its next turn prefills only the rest;
  without reuse: the same turn's prompt (the same token ids) on a fresh engine of the same size, whose cache
                 holds nothing: the whole prompt is prefilled. It runs right after the reuse arm's turn, on
                 the same model object, so machine noise hits both arms alike. It stops at its first token
                 (which must equal the reuse arm's: same greedy token from the cached and the computed prefix).

Time to first token is the engine's: from `add` to the step that sampled the first token. Prints per turn
the median TTFT of both arms, their ratio, and the prompt tokens reused (of those reusable: every full block
of the last turn's prompt and answer but the last answer token, whose KV is never computed).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from streamer.config import ModelSettings
from streamer.engine.engine import Engine, EngineConfig, Finished, TokenRequest
from streamer.engine.load import load_worker
from streamer.engine.worker import LLMWorker, trim_generated
from streamer.tasks.chat import History, chat_messages
from streamer.tasks.chat import Turn as Said

SYSTEM = "You are a concise assistant for a stream-processing team. Answer in two or three sentences."
TOPICS = ["Kafka", "Redis", "the KV cache of a language model", "consistent hashing", "backpressure",
          "exactly-once delivery", "watermarks in stream processing", "Raft consensus"]
ASKS = ["What is {}?", "How does it work inside?", "What goes wrong with it in production?",
        "How would you monitor it?", "Summarize what we discussed in one sentence."]


@dataclass
class Turn:
    prompt_tokens: int
    reusable: int  # full blocks of the last turn's prompt and answer, in tokens
    reused: int
    ttft_reuse_s: float
    ttft_fresh_s: float


@dataclass
class Conversation:
    session: str
    topic: str
    history: History = field(default_factory=History)
    held: int = 0  # tokens the engine held at the end of the last turn (prompt + answer)


def run_one(engine: Engine, request: TokenRequest) -> tuple[Finished, float]:
    """The request alone on `engine`: its result and time to first token."""
    added = time.monotonic()
    assert engine.add(0, request, added + 60) is None
    done: list[Finished] = []
    while not engine.idle:
        done += engine.step()
    assert done[0].first_token_s is not None
    return done[0], done[0].first_token_s - added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--num-blocks", type=int, default=512, help="KV blocks of 16 tokens, both arms")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadier on a shared machine, where 2 threads stall on each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    worker: LLMWorker = load_worker(ModelSettings())
    config = EngineConfig(num_blocks=args.num_blocks)
    print(f"{worker.name} on {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.conversations} conversations x {args.turns} turns, answers up to {args.max_new_tokens} tokens")
    engine = Engine(worker.model, config, worker.eos_ids)
    run_one(Engine(worker.model, config, worker.eos_ids), TokenRequest((1, 2, 3), 2))  # warm up
    chats = [Conversation(f"chat-{i}", TOPICS[i % len(TOPICS)]) for i in range(args.conversations)]
    turns: list[list[Turn]] = [[] for _ in range(args.turns)]
    same_first = 0
    for n in range(args.turns):
        for chat in chats:
            said = ASKS[n % len(ASKS)].format(chat.topic)
            prompt = tuple(worker.prompt_ids([chat_messages(chat.history, said, SYSTEM)])[0])
            request = TokenRequest(prompt, args.max_new_tokens, stop_ids=worker.eos_ids, session=chat.session)
            before = engine.scheduler.reused_tokens
            done, ttft_reuse = run_one(engine, request)
            reused = engine.scheduler.reused_tokens - before
            fresh, ttft_fresh = run_one(Engine(worker.model, config, worker.eos_ids),
                                        replace(request, max_new_tokens=1))
            same_first += fresh.tokens == done.tokens[:1]
            reusable = max(chat.held - 1, 0) // config.block_size * config.block_size
            turns[n].append(Turn(len(prompt), reusable, reused, ttft_reuse, ttft_fresh))
            chat.held = len(prompt) + len(done.tokens)
            answer = worker.decode(trim_generated(done.tokens, args.max_new_tokens, worker.eos_ids, False))
            turn = Said(f"{chat.session}-{n}", said, answer, tokens=0)
            chat.history = replace(chat.history, turns=(*chat.history.turns, turn))
    print("| turn | prompt tokens (median) | reused / reusable tokens (sum) | TTFT with reuse ms (median) "
          "| TTFT without ms (median) | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, rows in enumerate(turns, 1):
        with_s = statistics.median(t.ttft_reuse_s for t in rows)
        without_s = statistics.median(t.ttft_fresh_s for t in rows)
        print(f"| {n} | {statistics.median(t.prompt_tokens for t in rows):.0f} "
              f"| {sum(t.reused for t in rows)} / {sum(t.reusable for t in rows)} "
              f"| {with_s * 1000:.1f} | {without_s * 1000:.1f} | {without_s / with_s:.2f}x |")
    last = turns[-1]
    ratio = statistics.median(t.ttft_fresh_s for t in last) / statistics.median(t.ttft_reuse_s for t in last)
    print(f"turn {args.turns}: TTFT {ratio:.2f}x lower with prefix reuse (target >= 3x); "
          f"first tokens equal in both arms: {same_first} of {args.conversations * args.turns}")


if __name__ == "__main__":
    main()
