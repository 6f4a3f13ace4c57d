"""Size, speed and quality of a model, measured the same way for the source and the compressed model.

Speed is measured in interleaved rounds (source, compressed, source, ...) and the best round kept,
so a noisy shared machine slows both alike. Agreement is teacher-forced: the compressed model reads
the source's greedy continuation and we count how often its own argmax picks the same next token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from streamer.compress.evalset import EvalSet
from streamer.compress.manifest import Figures
from streamer.models.memory import resident_bytes  # the figure a serving worker reports, too

AGREEMENT_TOKENS = 32
SPEED_TOKENS_B1 = 64
SPEED_TOKENS_B32 = 16
SPEED_ROUNDS = 3
EVAL_BATCH = 32


@dataclass
class Reference:
    """The source's greedy continuations of the eval prompts: (prompt ids, continuation ids) each."""

    rows: list[tuple[list[int], list[int]]]


def parameter_count(model: nn.Module) -> int:
    """Parameters, int8 ones included (quantized modules keep their weights as frozen Parameters)."""
    return sum(p.numel() for p in model.parameters())


def disk_bytes(directory: Path) -> int:
    """Bytes of the weight files in a model directory (config and tokenizer excluded)."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.suffix in (".safetensors", ".pt", ".bin"))


def _chat_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as one user turn in the chat template, ending in the assistant header."""
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    enc = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)
    return [list(ids) for ids in enc["input_ids"]]


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _greedy(model: nn.Module, tokenizer, rows: Sequence[list[int]], new_tokens: int, fixed: bool) -> torch.Tensor:
    """Up to `new_tokens` greedy tokens per row; `fixed` suppresses EOS so every row costs the same."""
    ids, mask = _left_pad(rows, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens if fixed else None,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[:, ids.shape[1] :].cpu()


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The answer up to and including its first EOS: what follows it is padding, not the source's choice."""
    end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens) - 1)
    return tokens[: end + 1]


@torch.inference_mode()
def reference(model: nn.Module, tokenizer, prompts: Sequence[str]) -> Reference:
    """Greedy answers as the source would give them, EOS included (suppressing it would make the
    source's own argmax disagree wherever it wanted to stop)."""
    eos = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    prompt_rows = _chat_ids(tokenizer, prompts)
    rows = []
    for start in range(0, len(prompt_rows), EVAL_BATCH):
        chunk = prompt_rows[start : start + EVAL_BATCH]
        generated = _greedy(model, tokenizer, chunk, AGREEMENT_TOKENS, fixed=False)
        rows.extend((p, _until_eos(g.tolist(), eos)) for p, g in zip(chunk, generated, strict=True))
    return Reference(rows)


@torch.inference_mode()
def agreement(model: nn.Module, tokenizer, ref: Reference) -> float:
    """Share of the source's greedy tokens that the model also predicts, reading the same prefix."""
    device = next(model.parameters()).device
    matched = total = 0
    for start in range(0, len(ref.rows), EVAL_BATCH):
        chunk = ref.rows[start : start + EVAL_BATCH]
        ids, mask = _left_pad([p + g for p, g in chunk], tokenizer.pad_token_id)
        predicted = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
        for i, (_, generated) in enumerate(chunk):
            n = len(generated)
            # logits at position t predict token t+1: the last n+1..1 positions predict the continuation
            guesses = predicted[i, -n - 1 : -1]
            matched += int((guesses == torch.tensor(generated)).sum())
            total += n
    return matched / total


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer, texts: Sequence[str]) -> float:
    """Token-weighted perplexity over the texts, each scored on its own."""
    device = next(model.parameters()).device
    nll = 0.0
    count = 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / count)


@torch.inference_mode()
def tokens_per_second(models: Sequence[nn.Module], tokenizer, prompts: Sequence[str], batch: int) -> list[float]:
    """Greedy decode throughput of each model at `batch`, best of interleaved rounds."""
    rows = _chat_ids(tokenizer, [prompts[i % len(prompts)] for i in range(batch)])
    new_tokens = SPEED_TOKENS_B1 if batch == 1 else SPEED_TOKENS_B32
    for model in models:  # warm-up: first calls allocate and pick kernels
        _greedy(model, tokenizer, rows, 2, fixed=True)
    best = [0.0] * len(models)
    for _ in range(SPEED_ROUNDS):
        for i, model in enumerate(models):
            start = time.perf_counter()
            _greedy(model, tokenizer, rows, new_tokens, fixed=True)
            best[i] = max(best[i], batch * new_tokens / (time.perf_counter() - start))
    return best


def compare(
    source: nn.Module,
    compressed: nn.Module,
    tokenizer,
    evalset: EvalSet,
    source_dir: Path,
    compressed_dir: Path,
    progress: bool = True,
) -> tuple[Figures, Figures]:
    """Figures for the source and the compressed model, measured side by side in this process."""
    bar = tqdm(total=5, desc="measuring", disable=not progress)
    speeds = []
    for batch in (1, 32):
        bar.set_postfix_str(f"tokens/s at batch {batch}")
        speeds.append(tokens_per_second([source, compressed], tokenizer, evalset.prompts, batch))
        bar.update()
    bar.set_postfix_str("source's greedy answers")
    ref = reference(source, tokenizer, evalset.prompts)
    bar.update()
    figures = []
    for i, (model, directory) in enumerate(((source, source_dir), (compressed, compressed_dir))):
        bar.set_postfix_str("quality of " + ("the source" if i == 0 else "the compressed model"))
        figures.append(
            Figures(
                params=parameter_count(model),
                disk_bytes=disk_bytes(directory),
                resident_bytes=resident_bytes(model),
                tokens_per_s_b1=speeds[0][i],
                tokens_per_s_b32=speeds[1][i],
                perplexity=perplexity(model, tokenizer, evalset.texts),
                agreement=None if i == 0 else agreement(model, tokenizer, ref),
            )
        )
        bar.update()
    bar.close()
    return figures[0], figures[1]
