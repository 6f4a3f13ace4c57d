"""What a window keeps: incremental label counts that arrive late, stats, and bounded summarize texts."""

from streamer.windows.content import Content, ContentAggregator, LabelSlot, WindowItem

TEXTS = ContentAggregator(keep_texts=True, keep_keys=True)


def item(text: str, ts_ms: int, key: str = "k", slot: LabelSlot | None = None) -> WindowItem:
    return WindowItem(text, ts_ms, key, tokens=len(text.split()), slot=slot)


def test_a_label_resolved_later_is_counted_in_every_window_holding_the_event():
    first, second, slot = TEXTS.create(), TEXTS.create(), LabelSlot()
    TEXTS.add(first, item("great", 1, slot=slot))
    TEXTS.add(second, item("great", 1, slot=slot))
    assert first.slots and second.slots
    slot.resolve("positive")
    assert first.labels == second.labels == {"positive": 1}
    assert not first.slots and not second.slots


def test_a_window_learns_when_its_last_pending_label_arrives():
    content, slot, told = TEXTS.create(), LabelSlot(), []
    TEXTS.add(content, item("meh", 1, slot=slot))
    content.on_resolved = lambda: told.append(True)
    slot.resolve(None)  # a failed classification counts no label but still resolves
    assert told == [True] and not content.labels


def test_a_session_merge_moves_pending_labels_to_the_surviving_window():
    into, other, slot = TEXTS.create(), TEXTS.create(), LabelSlot()
    TEXTS.add(into, item("fine", 5, key="a"))
    TEXTS.add(other, item("bad", 1, key="b", slot=slot))
    TEXTS.merge(into, other)
    slot.resolve("negative")
    assert into.labels == {"negative": 1}
    assert (into.count, into.chars_min, into.chars_max, into.keys) == (2, 3, 4, {"a", "b"})


def test_texts_past_the_budget_are_folded_and_the_summary_leads_the_next_fold():
    content = Content()
    for n in range(3):
        TEXTS.add(content, item(f"message {n}", 10 - n))
    assert content.needs_fold(max_events=2, max_tokens=1000)
    assert content.take_for_fold() == ["message 2", "message 1", "message 0"]  # chronological
    assert not content.texts and not content.needs_fold(max_events=0, max_tokens=0)  # one fold at a time
    content.fold_done("summary so far")
    TEXTS.add(content, item("message 3", 20))
    assert content.chronological_texts() == ["summary so far", "message 3"]


def test_a_session_merged_away_while_its_texts_fold_hands_the_summary_to_the_survivor():
    """Adversarial review, finding 8: the fold's answer landed in the discarded session, and the survivor
    did not wait for it: the texts taken for folding were missing from the final summary."""
    into, other, third = TEXTS.create(), TEXTS.create(), TEXTS.create()
    TEXTS.add(into, item("early", 1))
    for n in range(3):
        TEXTS.add(other, item(f"later {n}", 10 + n))
    assert other.take_for_fold() == ["later 0", "later 1", "later 2"]
    TEXTS.merge(into, other)
    TEXTS.merge(third, into)  # and the survivor is absorbed in turn
    assert not third.settled_folds, "the final summary must wait for the fold"
    other.fold_done("summary of later 0-2")
    assert third.settled_folds
    assert third.chronological_texts() == ["summary of later 0-2", "early"]
