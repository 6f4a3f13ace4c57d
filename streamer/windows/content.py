"""What a window keeps of its events, updated incrementally per event (never recomputed at close).

Label counts arrive after an event joined its windows (classification runs in the batcher), so each
event's label is a `LabelSlot` that updates every window holding it when it resolves, and remembers
it for windows rebuilt later (a partition was revoked: see `WindowEngine.drop`). Texts for
`summarize` are bounded: past `max_events` or `max_tokens` the window folds them into a running
summary (map-reduce), so a prompt never grows without bound and no event is dropped. (An engine
across partitions still holds each open window's events, which a rebuild folds in afresh.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LabelSlot:
    """One event's label, pending until its classification returns."""

    contents: list[Content] = field(default_factory=list)
    resolved: bool = False
    label: str | None = None

    def resolve(self, label: str | None) -> None:
        """Count the label (None: the classification failed) in every window holding the event."""
        self.resolved, self.label = True, label
        for content in self.contents:
            if label is not None:
                content.labels[label] += 1
            content.slots.remove(self)
            if not content.slots and content.on_resolved is not None:
                content.on_resolved()
        self.contents.clear()


@dataclass(slots=True)
class WindowItem:
    """What a window keeps of one event; never changed once made (not frozen: one is made per event, and a
    frozen dataclass's __init__ costs three times as much)."""

    text: str
    ts_ms: int
    key: str | None
    tokens: int
    slot: LabelSlot | None = None


@dataclass
class Content:
    """The aggregate of one window."""

    texts: list[tuple[int, str, int]] = field(default_factory=list)  # (ts_ms, text, tokens), for summarize
    text_tokens: int = 0
    summary: str | None = None  # folded summary of texts no longer held
    folding: bool = False
    merged_into: Content | None = None  # the session that absorbed this one (its fold's answer goes there)
    folds_elsewhere: int = 0  # folds under way in contents merged into this one
    labels: Counter[str] = field(default_factory=Counter)
    slots: list[LabelSlot] = field(default_factory=list)  # labels still on their way
    on_resolved: Callable[[], None] | None = None
    chars_min: int = 0
    chars_max: int = 0
    chars_sum: int = 0
    count: int = 0
    tokens_total: int = 0
    keys: set[str | None] = field(default_factory=set)

    def needs_fold(self, max_events: int, max_tokens: int) -> bool:
        return not self.folding and (len(self.texts) > max_events or self.text_tokens > max_tokens)

    def take_for_fold(self) -> list[str]:
        """The texts to fold (with the summary so far first); the window keeps only what arrives next."""
        chunk = ([self.summary] if self.summary else []) + [text for _, text, _ in sorted(self.texts)]
        self.texts, self.text_tokens, self.folding = [], 0, True
        return chunk

    def fold_done(self, summary: str) -> None:
        """The fold's answer; a session merged away meanwhile hands it to the one that absorbed it."""
        self.folding = False
        if self.merged_into is None:
            self.summary = summary
            return
        survivor = self.merged_into
        while survivor.merged_into is not None:
            survivor = survivor.merged_into
        survivor.texts.append((0, summary, 0))
        survivor.folds_elsewhere -= 1

    @property
    def settled_folds(self) -> bool:
        """No fold of this window's texts is under way (its own, or one of a session it absorbed)."""
        return not self.folding and not self.folds_elsewhere

    @property
    def settled(self) -> bool:
        """Every label has arrived and no fold is under way: the window can be emitted as it is."""
        return not self.slots and self.settled_folds

    def chronological_texts(self) -> list[str]:
        return ([self.summary] if self.summary else []) + [text for _, text, _ in sorted(self.texts)]


@dataclass(frozen=True)
class ContentAggregator:
    """The window engine's aggregator: which parts of Content a route keeps."""

    keep_texts: bool
    keep_keys: bool
    keep_stats: bool = True

    def create(self) -> Content:
        return Content()

    def add(self, content: Content, item: WindowItem) -> Content:
        content.count += 1
        if self.keep_stats:
            size = len(item.text)
            content.chars_min = size if content.count == 1 else min(content.chars_min, size)
            content.chars_max = max(content.chars_max, size)
            content.chars_sum += size
            content.tokens_total += item.tokens
        if self.keep_keys:
            content.keys.add(item.key)
        if self.keep_texts:
            content.texts.append((item.ts_ms, item.text, item.tokens))
            content.text_tokens += item.tokens
        if item.slot is not None and item.slot.resolved:  # a window rebuilt after its label came
            if item.slot.label is not None:
                content.labels[item.slot.label] += 1
        elif item.slot is not None:
            item.slot.contents.append(content)
            content.slots.append(item.slot)
        return content

    def merge(self, into: Content, other: Content) -> Content:
        """Session merge: `into` absorbs `other`, including labels still on their way to `other`."""
        if other.count:
            into.chars_min = min(into.chars_min, other.chars_min) if into.count else other.chars_min
        into.count += other.count
        into.chars_max = max(into.chars_max, other.chars_max)
        into.chars_sum += other.chars_sum
        into.tokens_total += other.tokens_total
        into.keys |= other.keys
        into.texts += other.texts
        into.text_tokens += other.text_tokens
        if other.summary:
            into.texts.append((0, other.summary, 0))
        into.labels += other.labels
        for slot in other.slots:
            slot.contents[:] = [into if c is other else c for c in slot.contents]
        into.slots += other.slots
        other.merged_into = into
        into.folds_elsewhere += other.folds_elsewhere + other.folding
        return into
