"""Which partitions the consumer cannot fetch right now, read from librdkafka's statistics.

A partition with no input is quiet, one whose leader is unknown or not connected is cut off: only
the first may count as idle for watermarks. librdkafka reports both in its periodic statistics
(`statistics.interval.ms`): per partition its `leader` broker id (-1 while unknown, e.g. during a
broker outage) and per broker its connection `state` ("UP" when usable).
"""

from __future__ import annotations

from typing import Any

from streamer.kafka.offsets import TP

STATS_INTERVAL_MS = 1000


def unreachable(stats: dict[str, Any]) -> frozenset[TP]:
    """The partitions in `stats` (the client's, one JSON document) whose leader is not usable now."""
    up = {broker["nodeid"] for broker in stats.get("brokers", {}).values()
          if broker.get("state") == "UP" and broker.get("nodeid", -1) >= 0}
    return frozenset(
        (topic, int(partition))
        for topic, entry in stats.get("topics", {}).items()
        for partition, info in entry.get("partitions", {}).items()
        if partition != "-1" and info.get("leader", -1) not in up  # "-1": librdkafka's unassigned queue
    )
