"""The continuous-batching engine on a tiny random Llama: same greedy tokens as `generate`, whatever
the chunking, preemption or prefix reuse (a chat session's pinned history included); label scores equal
a plain forward pass; failures isolated."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from streamer.engine.engine import Engine, EngineConfig, Finished, TokenRequest
from streamer.engine.paged import supports

VOCAB = 97


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def reference(model: LlamaForCausalLM, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_all(engine: Engine, requests: list[TokenRequest], deadlines: list[float] | None = None) -> dict[int, Finished]:
    for i, request in enumerate(requests):
        assert engine.add(i, request, deadlines[i] if deadlines else 0.0) is None
    done: dict[int, Finished] = {}
    for _ in range(10_000):
        if engine.idle:
            break
        done.update((f.key, f) for f in engine.step())  # type: ignore[misc]
    assert engine.idle and engine.allocator.in_use == 0
    return done


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(n)]


@pytest.mark.parametrize("config", [
    EngineConfig(block_size=4, num_blocks=256, max_running=8, max_step_tokens=512),
    EngineConfig(block_size=4, num_blocks=256, max_running=3, max_step_tokens=7),  # chunked prefill
    EngineConfig(block_size=2, num_blocks=40, max_running=8, max_step_tokens=64),  # preemption by recompute
], ids=["roomy", "chunked", "preempting"])
def test_greedy_tokens_equal_one_by_one_generate(model: LlamaForCausalLM, config: EngineConfig) -> None:
    batch = prompts(12)
    news = [random.Random(i).randint(1, 24) for i in range(len(batch))]
    engine = Engine(model, config, end_ids=frozenset())
    done = run_all(engine, [TokenRequest(tuple(p), n) for p, n in zip(batch, news, strict=True)],
                   deadlines=[float(i % 3) for i in range(len(batch))])
    for i, (p, n) in enumerate(zip(batch, news, strict=True)):
        assert done[i].tokens == reference(model, p, n), f"request {i} diverged"


def test_decodes_of_far_apart_lengths_run_in_separate_groups_and_still_match_generate(model: LlamaForCausalLM) -> None:
    rng = random.Random(5)
    batch = [[rng.randrange(1, VOCAB) for _ in range(n)] for n in (3, 190, 6, 150, 9)]
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=512), end_ids=frozenset())
    done = run_all(engine, [TokenRequest(tuple(p), 20) for p in batch])
    for i, p in enumerate(batch):
        assert done[i].tokens == reference(model, p, 20), f"request {i} diverged"


def test_prompts_sharing_a_prefix_reuse_its_blocks_and_still_match_generate(model: LlamaForCausalLM) -> None:
    system = prompts(1, seed=9)[0] * 2  # a long shared "system prompt"
    batch = [system + tail for tail in prompts(6, seed=3)]
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=256), end_ids=frozenset())
    first = run_all(engine, [TokenRequest(tuple(batch[0]), 5)])
    rest = run_all(engine, [TokenRequest(tuple(p), 5) for p in batch[1:]])
    assert first[0].tokens == reference(model, batch[0], 5)
    for i, p in enumerate(batch[1:]):
        assert rest[i].tokens == reference(model, p, 5)
    assert engine.allocator.available == engine.allocator.num_blocks  # cached blocks count as available


@pytest.mark.parametrize("session", ["chat", None], ids=["pinned", "unpinned"])
def test_each_chat_turn_reuses_the_last_turns_prompt_and_answer_through_other_traffic(
        model: LlamaForCausalLM, session: str | None) -> None:
    # Between turns, other traffic (3 waves of 4 prompts of 24 tokens, 28 blocks a wave) churns the cached blocks;
    # the history's pinned blocks (up to 58) and a wave fit together, so pins never have to give way.
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=96, pinned_sessions=2), end_ids=frozenset())
    held: list[int] = []
    reused: list[int] = []
    for turn, message in enumerate(prompts(5, seed=11)):
        prompt = [*held, *message]
        before = engine.scheduler.reused_tokens
        done = run_all(engine, [TokenRequest(tuple(prompt), 6, session=session)])
        reused.append(engine.scheduler.reused_tokens - before)
        assert done[0].tokens == reference(model, prompt, 6), f"turn {turn} diverged"
        if session:
            assert reused[-1] == max(len(held) - 1, 0) // 4 * 4, f"turn {turn} recomputed its history"
        held = prompt + done[0].tokens
        for wave in range(3):
            run_all(engine, [TokenRequest(tuple(p * 24)[:24], 1) for p in prompts(4, seed=10 * turn + wave + 20)])
    assert engine.allocator.pinned_sessions == (1 if session else 0)
    if not session:
        assert reused[-1] == 0, "without a pin the churn evicted the history"


def test_a_stop_id_ends_the_answer_and_is_returned_last(model: LlamaForCausalLM) -> None:
    p = prompts(1)[0]
    expected = reference(model, p, 8)
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=64), end_ids=frozenset())
    done = run_all(engine, [TokenRequest(tuple(p), 8, stop_ids=frozenset({expected[2]}))])
    assert done[0].tokens == expected[: expected.index(expected[2]) + 1]


def test_label_log_probs_equal_a_plain_forward_pass(model: LlamaForCausalLM) -> None:
    prompt, labels, end = prompts(1, seed=5)[0], ((5, 6), (7,), (8, 9, 10)), 3
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=64), end_ids=frozenset({end}))
    done = run_all(engine, [TokenRequest(tuple(prompt), labels=labels)])
    for label, got in zip(labels, done[0].label_logprobs, strict=True):
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(torch.tensor([prompt + list(label)])).logits[0].float(), dim=-1)
        start = len(prompt) - 1
        want = [float(logprobs[start + i, t]) for i, t in enumerate(label)] + [float(logprobs[-1, end])]
        assert got == pytest.approx(want, abs=1e-4)


def test_a_request_that_breaks_the_step_fails_alone_and_the_others_are_answered(model: LlamaForCausalLM) -> None:
    poison = 13
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=128), end_ids=frozenset())
    step = engine.runner.step

    def breaks_on_poison(rows):  # type: ignore[no-untyped-def]
        if any(poison in row.tokens for row in rows):
            raise RuntimeError("poisoned input")
        return step(rows)

    engine.runner.step = breaks_on_poison  # type: ignore[method-assign]
    clean = [p for p in prompts(6) if poison not in p]
    requests = [TokenRequest(tuple(p), 3) for p in clean] + [TokenRequest((1, 2, poison), 3)]
    done = run_all(engine, requests)
    bad = len(clean)
    assert done[bad].error is not None and "poisoned input" in done[bad].error
    for i, p in enumerate(clean):
        assert done[i].error is None and done[i].tokens == reference(model, p, 3)
    assert engine.scheduler.max_running == engine.config.max_running, "isolation ends with the last suspect"


def test_a_request_whose_logits_cannot_be_sampled_fails_alone_and_the_others_are_answered(
        model: LlamaForCausalLM) -> None:
    poison = 13
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=128), end_ids=frozenset())
    step = engine.runner.step

    def nan_logits_on_poison(rows):  # type: ignore[no-untyped-def]
        logits = step(rows)
        return torch.full_like(logits, float("nan")) if any(poison in row.tokens for row in rows) else logits

    engine.runner.step = nan_logits_on_poison  # type: ignore[method-assign]
    clean = [p for p in prompts(4) if poison not in p]
    requests = [TokenRequest(tuple(p), 3) for p in clean] + [TokenRequest((1, 2, poison), 3, temperature=0.7)]
    done = run_all(engine, requests)
    assert done[len(clean)].error is not None and "probability tensor" in done[len(clean)].error
    for i, p in enumerate(clean):
        assert done[i].error is None and done[i].tokens == reference(model, p, 3)


def test_a_step_failing_mid_answer_requeues_a_request_that_fills_the_cache_and_it_still_finishes(
        model: LlamaForCausalLM) -> None:
    prompt, later = prompts(2, seed=11)
    prompt = (prompt * 30)[:30]  # 30 + 30 tokens: 4 blocks of 16, the whole cache
    engine = Engine(model, EngineConfig(block_size=16, num_blocks=4), end_ids=frozenset())
    step, steps = engine.runner.step, itertools.count()

    def fails_once_mid_answer(rows):  # type: ignore[no-untyped-def]
        if next(steps) == 10:  # the prompt's step and 9 decodes ran: 10 tokens generated
            raise RuntimeError("CUDA out of memory (injected)")
        return step(rows)

    engine.runner.step = fails_once_mid_answer  # type: ignore[method-assign]
    done = run_all(engine, [TokenRequest(tuple(prompt), 30)])
    assert done[0].error is None and done[0].tokens == reference(model, prompt, 30)
    assert run_all(engine, [TokenRequest(tuple(later), 5)])[0].tokens == reference(model, later, 5)


def test_a_request_larger_than_the_cache_is_answered_with_an_error_at_once(model: LlamaForCausalLM) -> None:
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=4), end_ids=frozenset())
    finished = engine.add("big", TokenRequest(tuple(range(1, 20)), 10), 0.0)
    assert finished is not None and "exceed the KV cache" in (finished.error or "")


def test_the_engine_drives_llama_family_models_only() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    assert not supports(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
