"""The texts recipes learn from, as token ids: the user's corpus (a file, or the events recorded in
a Kafka topic), or Python's documentation.

Calibration (smoothing's activation maxima, low-rank's Gram matrices) and training (distillation,
recovery) read texts the same way: tokenized, joined with EOS, cut into rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from streamer.compress.errors import CompressError

DEFAULT_TEXTS = 20


@dataclass(frozen=True)
class TopicCorpus:
    """The events recorded in a Kafka topic (from its beginning), read for their `text` field."""

    topic: str
    client: dict[str, Any] = field(repr=False)  # librdkafka settings: bootstrap, SASL/TLS
    limit: int | None = None

    def __str__(self) -> str:
        return f"kafka topic {self.topic}"


def read(source: Path | TopicCorpus) -> list[str]:
    """The corpus's texts, from a file or a topic; a corpus with none is an error."""
    if isinstance(source, TopicCorpus):
        from streamer.kafka.tools import read_topic

        records = (m.value() or b"" for m in read_topic(source.client, source.topic, limit=source.limit))
        texts = event_texts(records)
        if not texts:
            raise CompressError(f"{source} has no events with a 'text' field")
        return texts
    return read_corpus(source)


def event_texts(records: Iterable[bytes]) -> list[str]:
    """The non-empty `text` of each JSON event; records that are not such events are skipped (an
    input topic also holds what was dead-lettered)."""
    texts = []
    for record in records:
        try:
            event = json.loads(record)
        except ValueError:
            continue
        text = event.get("text") if isinstance(event, dict) else None
        if isinstance(text, str) and text.strip():
            texts.append(text.strip())
    return texts


def read_corpus(path: Path) -> list[str]:
    """JSONL lines with a `text` field (what `streamer tail --json` records), or a plain text file
    split into paragraphs."""
    if not path.is_file():
        raise CompressError(f"corpus {path} not found")
    raw = path.read_text()
    if path.suffix == ".jsonl":
        texts = [str(json.loads(line).get("text", "")) for line in raw.splitlines() if line.strip()]
    else:
        texts = raw.split("\n\n")
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise CompressError(f"corpus {path} has no texts")
    return texts


def default_texts() -> list[str]:
    """Python's documentation topics (shipped with CPython): generic English prose, not the eval set."""
    from pydoc_data.topics import topics

    return list(topics.values())[:DEFAULT_TEXTS]


def token_ids(texts: Sequence[str], tokenizer, limit: int | None = None) -> list[int]:
    """The texts tokenized and joined with EOS, at most `limit` tokens (tokenizing stops there)."""
    ids: list[int] = []
    for text in texts:
        if limit is not None and len(ids) >= limit:
            break
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return ids[:limit]


def one_row(texts: Sequence[str], tokenizer, limit: int, device: torch.device) -> torch.Tensor:
    """The first `limit` tokens of `texts` as one row (a batch of one) on `device`."""
    return torch.tensor([token_ids(texts, tokenizer, limit)], device=device)


def rows(ids: Sequence[int], width: int) -> torch.Tensor:
    """`ids` as rows of `width` tokens; the tail that does not fill a row is dropped."""
    count = len(ids) // width
    return torch.tensor(list(ids[: count * width])).reshape(count, width)
