"""What the page receives for each thing read from Redis, in the snapshot and the event stream alike."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

log = logging.getLogger(__name__)

_PAYLOAD_CHARS = 300  # a dead letter keeps the original bytes; the page needs only their start


def answer(entry_id: str, fields: dict[str, str]) -> dict[str, Any] | None:
    doc = parse(fields.get("answer"))
    return {"stream_id": entry_id, "answer": doc} if isinstance(doc, dict) else None


def partial(entry_id: str, fields: dict[str, str]) -> dict[str, Any] | None:
    """A delta of an answer being generated (`streamer.pipeline.partials`); the page types it out."""
    if "id" not in fields or not fields.get("seq", "").isdigit():
        return None
    return {"stream_id": entry_id, "id": fields["id"], "route": fields.get("route"), "run": fields.get("run"),
            "seq": int(fields["seq"]), "delta": fields.get("delta", ""), "final": fields.get("final") == "1",
            "error": fields.get("error") or None}


def dead_letter(entry_id: str, fields: dict[str, str]) -> dict[str, Any] | None:
    letter = parse(fields.get("dead_letter"))
    if not isinstance(letter, dict):
        return None
    if isinstance(payload := letter.get("payload"), str) and len(payload) > _PAYLOAD_CHARS:
        letter["payload"] = payload[:_PAYLOAD_CHARS] + "…"
    return {"stream_id": entry_id, "error": fields.get("error"), "dead_letter": letter}


def parse(doc: str | None) -> Any:
    """Parsed JSON, or None for a missing or malformed document (one bad entry must not blank the page)."""
    if doc is None:
        return None
    try:
        return orjson.loads(doc)
    except orjson.JSONDecodeError:
        log.debug("dashboard: skipping a malformed document: %.80s", doc)
        return None


def sse(event: str, data: Any) -> bytes:
    # orjson never emits a raw newline, so one `data:` line always carries the whole document.
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def problem(exc: Exception) -> bytes:
    # Debug only: the readers retry each second; the page itself shows the error.
    log.debug("dashboard: Redis read failed: %r", exc)
    return sse("problem", {"detail": f"Redis: {exc}"})


def ints(raw: dict[str, str]) -> dict[str, int]:
    return {k: int(v) for k, v in raw.items() if v.lstrip("-").isdigit()}


def now_ms() -> int:
    return int(time.time() * 1000)
