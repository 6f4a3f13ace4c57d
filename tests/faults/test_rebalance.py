"""Two instances in one consumer group on 6 partitions; one is SIGKILLed and the other takes its
partitions over; a third joins mid-stream (cooperative rebalance): nothing lost, nothing doubled.

On both route shapes of tests/faults/scenario.py: windows only, and windows on a route that classifies
every event with a model.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.scenario import Service, Stream, check, kill, produce, report, stop
from tests.integration.services import create_topic

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("shape", ["count", "reviews"])
def test_kill_one_of_two_then_a_third_joins_mid_stream(kafka_bootstrap, redis_url, tmp_path, shape):
    service, stream = Service(tmp_path, kafka_bootstrap, redis_url, shape=shape), Stream()
    create_topic(kafka_bootstrap, service.input, partitions=6)
    produce(kafka_bootstrap, service.input, stream, 0, 800, rate_per_s=None)
    a, b = service.start("a"), service.start("b")
    service.wait(lambda: service.counters().get("windows", 0) >= 8, 120, "the first windows")
    kill(a)
    killed_at = time.monotonic()
    produce(kafka_bootstrap, service.input, stream, 800, 1600, rate_per_s=None)
    service.wait(lambda: "assigned" in service.log.read_text().rpartition("--- start b")[2].split("revoked")[-1]
                 and service.finished(), 120, "b to take over a's partitions and catch up")
    takeover_s = time.monotonic() - killed_at
    c = service.start("c")
    service.wait(lambda: "assigned" in service.log.read_text().rpartition("--- start c")[2], 120, "c to join")
    produce(kafka_bootstrap, service.input, stream, 1600, stream.events, rate_per_s=80)
    service.wait(service.finished, 180, "offsets at the end")
    assert stop(b) == 0 and stop(c) == 0
    assert service.log.read_text().count("assigned") >= 3  # a, b, then b again (takeover) and c
    report(f"2 instances, one SIGKILLed, a third joins (exactly once, {shape})", check(service, stream), takeover_s)
