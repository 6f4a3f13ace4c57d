"""librdkafka settings shared by every client streamer creates, built in one place."""

from __future__ import annotations

from typing import Any

from streamer.config import KafkaSettings


def base_config(settings: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Bootstrap, the SASL/TLS settings, then the user's extra client settings (which win)."""
    return {"bootstrap.servers": bootstrap, **security_config(settings), **settings.client}


def security_config(settings: KafkaSettings) -> dict[str, Any]:
    """`kafka.sasl` and `kafka.tls` as librdkafka properties (security.protocol follows from which are set)."""
    sasl, tls = settings.sasl, settings.tls
    protocol = {(False, False): "plaintext", (False, True): "ssl",
                (True, False): "sasl_plaintext", (True, True): "sasl_ssl"}[(sasl is not None, tls is not None)]
    config: dict[str, Any] = {"security.protocol": protocol}
    if sasl is not None:
        config |= {"sasl.mechanism": sasl.mechanism, "sasl.username": sasl.username,
                   "sasl.password": sasl.password.get_secret_value()}
    if tls is not None:
        config["ssl.endpoint.identification.algorithm"] = "https" if tls.verify_hostname else "none"
        files = {"ssl.ca.location": tls.ca_file, "ssl.certificate.location": tls.cert_file,
                 "ssl.key.location": tls.key_file}
        config |= {key: str(path) for key, path in files.items() if path is not None}
        if tls.key_password is not None:
            config["ssl.key.password"] = tls.key_password.get_secret_value()
    return config


def tool_config(settings: KafkaSettings, bootstrap: str | None) -> dict[str, Any]:
    """`streamer produce` and `tail` log in as `streamer run` does; an explicit bootstrap wins over the config's."""
    return base_config(settings, bootstrap or settings.bootstrap_servers or "localhost:9092")


def describe_security(settings: KafkaSettings) -> str:
    """How the clients log in, for the startup summary: never the password."""
    sasl = f"SASL {settings.sasl.mechanism} as {settings.sasl.username}" if settings.sasl else "no SASL"
    return f"{sasl}, {'TLS' if settings.tls else 'no TLS'}"


TOPIC_DISCOVERY_MS = 5000
"""How often the consumer re-reads metadata: an input topic created after `streamer run` subscribed is
picked up within seconds, not after librdkafka's default 5 minutes."""


def consumer_config(settings: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Manual offsets: streamer commits only what has been fully written."""
    return {
        "topic.metadata.refresh.interval.ms": TOPIC_DISCOVERY_MS,
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
