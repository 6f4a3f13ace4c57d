"""The Faust integration's pure parts: what a window keeps, window bounds, and batch fan-out (no Faust needed)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.errors import StreamerError
from streamer.integrations.faust import ClosedWindow, map_batch
from streamer.integrations.window_tally import WindowTally

events = st.lists(st.tuples(st.sampled_from(["positive", "negative", "neutral"]), st.text(max_size=20)), max_size=40)


@given(events, st.integers(min_value=0, max_value=10))
def test_labels_add_up_to_the_events_and_texts_keep_the_first_few(seen: list[tuple[str, str]], max_texts: int) -> None:
    tally = WindowTally.of({})
    for label, text in seen:
        tally = WindowTally.of(tally.add(label, text, max_texts).to_json())  # through the table, as JSON
    assert tally.count == len(seen) == sum(tally.labels.values())
    assert all(n > 0 for n in tally.labels.values())
    assert tally.texts == tuple(text for _, text in seen[:max_texts])


def test_an_empty_table_value_is_an_empty_tally() -> None:
    assert WindowTally.of(None) == WindowTally.of({}) == WindowTally()


@given(st.integers(min_value=0, max_value=2_000_000_000), st.integers(min_value=1, max_value=86_400))
def test_faust_window_ranges_become_half_open_milliseconds(start_s: int, size_s: int) -> None:
    faust_range = (float(start_s), start_s + size_s - 0.1)  # how Faust hands a tumbling window to on_window_close
    assert ClosedWindow.of(("k", faust_range)) == ClosedWindow("k", start_s * 1000, (start_s + size_s) * 1000)


async def test_map_batch_keeps_order_and_returns_deliberate_failures_as_values() -> None:
    async def call(i: int) -> int:
        await asyncio.sleep((5 - i) / 1000)  # finish in reverse order
        if i == 2:
            raise StreamerError("bad item")
        return i * 10

    results = await map_batch(call, range(5))
    assert [r if isinstance(r, int) else "error" for r in results] == [0, 10, "error", 30, 40]


async def test_map_batch_propagates_bugs() -> None:
    async def call(i: int) -> int:
        return 1 // i

    with pytest.raises(ZeroDivisionError):
        await map_batch(call, [1, 0])


def test_importing_the_integration_needs_no_faust() -> None:
    assert "faust" not in sys.modules and "mode" not in sys.modules
