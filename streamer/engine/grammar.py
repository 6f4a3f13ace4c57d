"""Constrained decoding for the native engine: each constrained sequence has a matcher of its schema's grammar
(llguidance), which says before every sampling which tokens may come next; the others get -inf logits, so
greedy and sampled decoding alike only ever pick a token the grammar allows.

Matchers are per sequence, so one step mixes sequences of different schemas and unconstrained ones. Compiled
grammars are cached by schema text (a route's schema compiles once). llguidance was chosen by measurement
(bench/grammar_libs.py, BENCHMARKS.md): it computes a 49k-token mask in tens of microseconds, needs no
ahead-of-time compilation per vocabulary, and ships as one wheel without dependencies.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance import TokenizerWrapper

from streamer.tasks.schemas import ExtractSchema

log = logging.getLogger(__name__)

_CACHED_GRAMMARS = 64


class Constraint:
    """One sequence's grammar state: the tokens it allows next, advanced by each token sampled."""

    def __init__(self, matcher: llguidance.LLMatcher, stop_ids: Sequence[int]) -> None:
        self._matcher = matcher
        self._stop_ids = list(stop_ids)

    @property
    def error(self) -> str | None:
        """Why the grammar broke (a lexer limit, a token it refused), or None: the sequence's answer is that error."""
        return self._matcher.get_error() or None if self._matcher.is_error() else None

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed tokens into `bitmask[row]` (one bit per token id); a broken matcher allows only the
        stop ids, so the sequence ends at once (with `error`)."""
        if self._matcher.is_error():
            bitmask[row] = 0
            for token in self._stop_ids:
                bitmask[row, token // 32] |= 1 << (token % 32)
            return
        view = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * view.element_size())

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            log.warning("the grammar refused token %d: %s", token, self._matcher.get_error())


class Grammars:
    """Matchers for one tokenizer; its grammar tables are built on first use (about a second), not at load."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._grammars: OrderedDict[str, str] = OrderedDict()

    def constraint(self, schema: str) -> Constraint:
        """A fresh matcher of `schema` (canonical text); ValueError where the grammar cannot be built."""
        return Constraint(self.matcher(schema), self._stop_ids)

    def matcher(self, schema: str) -> llguidance.LLMatcher:
        if self._tokenizer is None:
            self._tokenizer = _ll_tokenizer(self._hf, self.vocab_size, self._stop_ids)
        matcher = llguidance.LLMatcher(self._tokenizer, self._grammar(schema), log_level=0)
        if matcher.is_error():
            raise ValueError(f"the schema's grammar cannot be used: {matcher.get_error()}")
        return matcher

    def _grammar(self, schema: str) -> str:
        if (grammar := self._grammars.get(schema)) is None:
            grammar = self._grammars[schema] = ExtractSchema(schema, "").grammar
            if len(self._grammars) > _CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        self._grammars.move_to_end(schema)
        return grammar


def _ll_tokenizer(hf: Any, vocab_size: int, stop_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face tokenizer: read from its serialized form, or, for a decoder llguidance
    cannot read (a character-level one), from each token's own text."""
    try:
        return llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=stop_ids)
    except ValueError:
        return llguidance.LLTokenizer(TokenizerWrapper(_TokenTexts(hf, vocab_size, stop_ids)), n_vocab=vocab_size,
                                      eos_token=stop_ids)


class _TokenTexts:
    """A tokenizer as `llguidance.TokenizerWrapper` reads one: every id's bytes (special tokens marked with the
    0xFF prefix llguidance reserves for them) and a way to encode text."""

    def __init__(self, hf: Any, vocab_size: int, stop_ids: list[int]) -> None:
        specials = set(hf.all_special_ids) | set(stop_ids)
        known = len(hf)
        self.eos_token_id = stop_ids[0]
        self.bos_token_id = hf.bos_token_id
        self.special_token_ids = sorted(specials)
        self.tokens = [b"\xff" + hf.convert_ids_to_tokens(i).encode() if i in specials
                       else hf.decode([i]).encode() if i < known else b"\xff[unused%d]" % i
                       for i in range(vocab_size)]
        self._hf = hf

    def __call__(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False))


def allow_only(rows: torch.Tensor, constrained: Sequence[tuple[int, Constraint]]) -> None:
    """Set to -inf, in place, every logit of `rows[n]` that `constraint` forbids, for each (n, constraint)."""
    vocab = rows.shape[-1]
    bitmask = torch.zeros((len(constrained), (vocab + 31) // 32), dtype=torch.int32)
    for i, (_, constraint) in enumerate(constrained):
        constraint.fill(bitmask, i)
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    forbidden = torch.from_numpy(bits == 0).to(rows.device)  # the logits live on the model's device
    index = torch.tensor([n for n, _ in constrained], device=rows.device)
    rows[index] = rows[index].masked_fill(forbidden, float("-inf"))
