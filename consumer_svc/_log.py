"""Logging glue: pika's stdlib logging bridged into twisted.logger, and JSON lines."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import LogEvent, Logger, LogLevel, formatEvent

from ._secrets import redact

#: pika lines that only restate what the service reports itself, better (and
#: the returned-message one would copy message bodies into the log).
_REDUNDANT = (
    "basic_cancel - consumer not found",
    "Published message was returned",
    "Message was Nack'ed by broker",
)


class _PikaBridge(logging.Handler):
    """Re-emits pika's records as twisted.logger events, passwords masked.

    pika's errors are demoted to warnings: each one accompanies an event the
    service logs itself, with the cause named.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = redact(record.getMessage())
        except Exception:
            message = redact(str(record.msg))
        if message.startswith(_REDUNDANT):
            return
        level = LogLevel.warn if record.levelno >= logging.WARNING else LogLevel.debug
        Logger(namespace=record.name).emit(level, "{pika_message}", pika_message=message)


def bridge_pika_logging(level: int = logging.WARNING) -> None:
    """Send pika's records at ``level`` and above to twisted.logger (idempotent)."""
    pika_logger = logging.getLogger("pika")
    if not any(isinstance(h, _PikaBridge) for h in pika_logger.handlers):
        pika_logger.addHandler(_PikaBridge())
    pika_logger.setLevel(level)
    pika_logger.propagate = False


def json_lines(out: IO[str] | None = None) -> Callable[[LogEvent], None]:
    """A log observer writing one JSON object per line: for journald and log shippers.

    Each line has ``time`` (UTC, ISO 8601), ``level``, ``namespace``,
    ``message`` (the event formatted as in the text log) and the event's own
    named fields (``queue``, ``cause``, ``delay`` ...); a failure adds
    ``traceback``. Use it with ``twistd --logger consumer_svc.json_lines``.
    """
    stream = out if out is not None else sys.stdout

    def observe(event: LogEvent) -> None:
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", "?"),
            "message": redact(formatEvent(event)),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in record:
                continue
            if isinstance(value, (str, int, float, bool)) or value is None:
                record[key] = redact(value) if isinstance(value, str) else value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = redact(failure.getTraceback())
        stream.write(json.dumps(record, default=str) + "\n")
        stream.flush()

    return observe
