"""What a framework's windowed table keeps per window so it can be classified and summarised on close.

Label counts are incremental (one classify per event, counted as it arrives), and only the first
`max_texts` texts are kept for the summary, so a window's value stays small however busy it gets: a
Faust table writes the whole value to its changelog topic on every update. The value crosses the
table as plain JSON (`to_json`/`of`), which every Faust store and serializer can hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class WindowTally:
    """Events seen in one window, their label counts, and a bounded sample of their texts (oldest first)."""

    count: int = 0
    labels: Mapping[str, int] = field(default_factory=dict)
    texts: tuple[str, ...] = ()

    @classmethod
    def of(cls, value: Mapping[str, Any] | None) -> WindowTally:
        """Read back a `to_json` value; a table's default (empty dict, None) is an empty tally."""
        if not value:
            return cls()
        return cls(int(value["count"]), dict(value["labels"]), tuple(value["texts"]))

    def add(self, label: str, text: str, max_texts: int) -> WindowTally:
        """One more event with its label; its text joins the summary sample while there is room."""
        labels = {**self.labels, label: self.labels.get(label, 0) + 1}
        texts = (*self.texts, text) if len(self.texts) < max_texts else self.texts
        return replace(self, count=self.count + 1, labels=labels, texts=texts)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "labels": dict(self.labels), "texts": list(self.texts)}
