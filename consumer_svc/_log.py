"""Logging glue: pika's stdlib logging, bridged into twisted.logger."""

from __future__ import annotations

import logging

from twisted.logger import Logger, LogLevel

from ._settings import redact

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
