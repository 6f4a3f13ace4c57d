"""A tiny random Llama with an offline character tokenizer, saved as a real model directory is: tests
load it through the real loader in milliseconds, with nothing downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHARS = list(" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!'\n:-;()\"")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(extra: str = "") -> Any:
    """Character-level, ChatML specials, and no pad token (the loader must add one); `extra` characters are
    added after the usual ones (JSON's braces, for constrained decoding), so other ids stay put."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS + [c for c in extra if c not in CHARS])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS)
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_llama(directory: Path, *, seed: int = 0, extra_chars: str = "", **config: Any) -> Path:
    """A random Llama (2 layers of width 32 unless `config` says otherwise) and the tokenizer, in `directory`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(extra_chars)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512, **config}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, **shape))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
