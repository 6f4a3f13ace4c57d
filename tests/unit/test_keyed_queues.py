"""The per-key FIFO that orders a conversation's turns: one item of a key out at a time, keys independent."""

from __future__ import annotations

from streamer.pipeline.keyed import KeyedQueues


def test_a_keys_items_go_out_one_at_a_time_in_arrival_order_while_other_keys_go_at_once() -> None:
    queues: KeyedQueues[str, int] = KeyedQueues()
    assert queues.push("a", 1) is True, "an idle key's item goes out at once"
    assert queues.push("b", 10) is True, "another key does not wait for the first"
    assert queues.push("a", 2) is False and queues.push("a", 3) is False
    assert queues.next("a") == 2
    assert queues.next("b") is None, "b is idle again"
    assert queues.next("a") == 3
    assert queues.next("a") is None
    assert queues.push("a", 4) is True, "an idle key starts afresh"


def test_dropping_takes_out_waiting_items_only_and_keeps_the_rest_in_order() -> None:
    queues: KeyedQueues[str, int] = KeyedQueues()
    for item in (1, 2, 3, 4, 5):
        queues.push("a", item)
    assert queues.drop(lambda item: item % 2 == 1) == 2, "3 and 5 were waiting; 1 is out and stays out"
    assert queues.next("a") == 2
    assert queues.next("a") == 4
    assert queues.next("a") is None
