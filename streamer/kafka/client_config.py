"""librdkafka settings shared by every client streamer creates, built in one place."""

from __future__ import annotations

from typing import Any

from streamer.config import KafkaSettings


def base_config(settings: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Bootstrap plus the user's extra client settings (security and the like)."""
    return {"bootstrap.servers": bootstrap, **settings.client}


def consumer_config(settings: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Manual offsets: streamer commits only what has been fully written."""
    return {
        **base_config(settings, bootstrap),
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "queued.max.messages.kbytes": 16384,
    }


def producer_config(settings: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Idempotent, so broker-side retries never duplicate an answer."""
    return {
        **base_config(settings, bootstrap),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
    }
