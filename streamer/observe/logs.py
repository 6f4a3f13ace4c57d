"""Process logging: JSON lines for log pipelines, plain lines for people, and no secrets in either.

Every record carries the run id, so the lines of one process run can be told apart after restarts
and across replicas. Redaction happens in a handler filter, before any formatter, so neither format
nor any later handler ever sees a password: not in the message, its arguments, `extra` fields or a
traceback.
"""

from __future__ import annotations

import json as jsonlib
import logging
import re
import secrets
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

REDACTED = "***"

# Keys whose values are secrets: password, sasl.password, ssl.key.password, ssl.keystore.password, ...
_SECRET_KEY = re.compile(r"(?:^|[._-])(?:password|passwd|secret)$", re.IGNORECASE)
# key=value, key: value, "key": "value" and 'key': 'value' (as in a logged dict) for those keys; not a
# URL's user name that happens to look like one (redis://password:...@host: its password is handled below).
_SECRET_PAIR = re.compile(
    r"""(?P<key>(?<![\w.-])(?<!://)[\w.-]*(?:password|passwd|secret))(?P<sep>["']?\s*[=:]\s*)(?P<value>"[^"]*"|'[^']*'|[^\s,;&}\]]+)""",
    re.IGNORECASE,
)
# The userinfo password of a URL: redis://user:pass@host, kafka://:pass@host.
# The password may itself hold "@" (unencoded), so it runs to the last "@" before the host.
_URL_PASSWORD = re.compile(r"(?P<prefix>[a-zA-Z][\w+.-]*://[^:/@\s]*):(?P<password>[^/\s]+)@")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime",
                                                                                    "run_id", "taskName"}
_PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def new_run_id() -> str:
    """A short random id for one process run."""
    return secrets.token_hex(6)


def setup_logging(level: str, *, json: bool, run_id: str, stream: TextIO | None = None) -> logging.Handler:
    """Route every logger through one redacting handler on the root logger (replacing its handlers).

    Returns the handler, so a caller (a test) can remove it again.
    """
    numeric_level = _level(level)  # before touching the root logger, so a bad level changes nothing
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RunIdFilter(run_id))
    handler.addFilter(RedactFilter())
    handler.setFormatter(JsonFormatter() if json else PlainFormatter(_PLAIN_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    return handler


def redact(text: str) -> str:
    """`text` with URL passwords and the values of secret-looking keys replaced by ***."""
    text = _URL_PASSWORD.sub(rf"\g<prefix>:{REDACTED}@", text)
    return _SECRET_PAIR.sub(_redacted_pair, text)


def _redacted_pair(match: re.Match[str]) -> str:
    value = match["value"]
    quote = value[0] if value[0] in "\"'" else ""
    return f"{match['key']}{match['sep']}{quote}{REDACTED}{quote}"


def _redact_value(key: str, value: Any) -> Any:
    """An `extra` value made safe: secret keys hidden whole, strings scrubbed, mappings walked."""
    if _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    return value


class RedactFilter(logging.Filter):
    """Scrubs a record in place before any formatter sees it (so every handler gets the safe text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(_message(record)), None
        for key in extra_fields(record):
            setattr(record, key, _redact_value(key, getattr(record, key)))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # arguments that do not fit the format: keep both rather than raise in a log call
        return f"{record.msg} (arguments: {record.args!r})"


class RunIdFilter(logging.Filter):
    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = self.run_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, run_id, the `extra` fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "run_id": getattr(record, "run_id", None),
        }
        doc.update({key: getattr(record, key) for key in extra_fields(record)})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        return jsonlib.dumps(doc, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """The human format, with `extra` fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{key}={getattr(record, key)}" for key in extra_fields(record))
        if not extras:
            return line
        head, newline, rest = line.partition("\n")  # keep a traceback below the extras
        return f"{head} {extras}{newline}{rest}"


def extra_fields(record: logging.LogRecord) -> list[str]:
    """Names of the attributes that came from `extra=` (not the LogRecord's own)."""
    return [key for key in record.__dict__ if key not in _RECORD_FIELDS and not key.startswith("_")]


def _level(level: str) -> int:
    levels = logging.getLevelNamesMapping()
    name = level.upper()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}; use one of debug, info, warning, error, critical")
    return levels[name]
