"""Structured logging: one JSON object per line on stderr.

Configured once at start-up. Extra fields passed with ``extra={...}`` become keys of
the line, and the request a task is serving (:data:`REQUEST_ID`) is added to every
line logged on its behalf, so a retry warning names its stream.

Log lines are data from outside as much as from us, so the formatter is defensive:

- every control character is escaped — the C0 ones by the JSON encoder, the rest
  (DEL, C1, line separators, bidi overrides) here — so one record is one line and a
  value cannot rewrite a terminal or fake a second line; so is a lone surrogate, so
  the line can be written at all;
- registered secrets (:func:`register_secrets`: API keys, caller keys) and anything
  shaped like a bearer token or an OpenAI key are replaced with ``[redacted]``.

User text is a matter for the caller of ``log``: it is logged only when
``VOXRELAY_LOG_TEXT=true`` (see :mod:`voxrelay.service.telemetry`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

__all__ = [
    "NOISY_LOGGERS",
    "REQUEST_ID",
    "JsonFormatter",
    "configure_logging",
    "redact",
    "register_secrets",
    "shorten",
]

#: The request id of the stream the current task serves (set by the doors).
REQUEST_ID: ContextVar[str | None] = ContextVar("voxrelay_request_id", default=None)

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
#: Libraries whose chatter (request lines with URLs, frames with user text) stays out.
NOISY_LOGGERS = ("httpx", "httpx2", "httpcore", "openai", "websockets", "grpc", "asyncio")

#: Characters the JSON encoder leaves raw that still harm a terminal or a log viewer, and
#: lone surrogates, which no UTF-8 stream can take (the handler's write would fail).
_UNSAFE = re.compile(
    "[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_TOKEN_SHAPES = re.compile(
    r"(?i)(?P<scheme>\bbearer\s+)[^\s\"',;]+"
    r"|\b(?:sk|rk|pk)-[\w*-]{8,}"
    r"|\*{3}\w*"  # the end of a key an upstream masked in an error ("sk-…***abcd")
)
#: A secret shorter than this would redact ordinary words; no real key is that short.
MIN_SECRET_CHARS = 6
REDACTED = "[redacted]"

_secrets: set[str] = set()


def register_secrets(values: Iterable[str | None]) -> None:
    """Never let any of *values* (API keys, caller keys) appear in a log line."""
    _secrets.update(v for v in values if v and len(v) >= MIN_SECRET_CHARS)


def redact(text: str) -> str:
    """Replace registered secrets and token-shaped strings in *text* with ``[redacted]``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _TOKEN_SHAPES.sub(lambda m: (m.group("scheme") or "") + REDACTED, text)


def shorten(value: str, limit: int) -> str:
    """Cut a caller-supplied *value* to *limit* characters, marking the cut with ``…``."""
    return value if len(value) <= limit else value[: max(limit - 1, 0)] + "…"


def _clean(value: Any) -> Any:
    """Make *value* JSON-ready with every string in it redacted."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {redact(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    return redact(str(value))


def _escape_unsafe(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line with its ``extra`` fields.

    *worker* (a worker process's index, when voxrelay runs several) is a field of every line.
    """

    def __init__(self, *, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            line["worker"] = self.worker
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if "request_id" not in line and (request_id := REQUEST_ID.get()) is not None:
            line["request_id"] = request_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        text = json.dumps(_clean(line), ensure_ascii=False)
        # JSON only puts these inside strings, where a \u escape means the same thing.
        return _UNSAFE.sub(_escape_unsafe, text)


def configure_logging(
    level: str = "info", *, secrets: Iterable[str | None] = (), worker: int | None = None
) -> None:
    """Send every log record to stderr as JSON lines, at *level* and above.

    *worker*: this process is the worker with that index; every line says so.
    """
    register_secrets(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker=worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
