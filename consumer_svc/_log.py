"""Logging glue: pika's stdlib logging bridged into twisted.logger, JSON lines, and
``--log-level`` applied to whichever log twistd writes (text or JSON, file or stdout)."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO, Any, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

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


class _Setup:
    """Where twistd was told to log and from which level; set by ``configure`` in makeService."""

    level = LogLevel.info
    #: twistd's ``--logfile`` and ``--nodaemon``, or None when not run by twistd.
    destination: tuple[str, bool] | None = None


def configure(level: str, logfile: str | None = None, nodaemon: bool = True) -> None:
    """Record ``--log-level`` and twistd's log destination before twistd starts logging."""
    _Setup.level = LogLevel.levelWithName(level)
    _Setup.destination = (logfile or "", nodaemon)


def _stream() -> IO[str]:
    """twistd's rule: stdout for ``-n`` without ``--logfile`` (or ``-``), else the file,
    ``twistd.log`` by default, rotated every 1 MB and on SIGUSR1."""
    if _Setup.destination is None:
        return sys.stdout
    path, nodaemon = _Setup.destination
    if path == "-" or (nodaemon and not path):
        return sys.stdout
    logfile = LogFile.fromFullPath(path or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(logfile.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return cast(IO[str], logfile)


def _at_level(observer: Callable[[LogEvent], None]) -> ILogObserver:
    predicate = LogLevelFilterPredicate(defaultLogLevel=_Setup.level)
    return FilteringLogObserver(cast(ILogObserver, observer), [predicate])


def text_lines() -> ILogObserver:
    """twistd's own text log, at ``--log-level``: what twistd writes without ``--logger``."""
    return _at_level(textFileLogObserver(_stream()))


def json_lines(out: IO[str] | None = None) -> ILogObserver:
    """A log observer writing one JSON object per line: for journald and log shippers.

    Each line has ``time`` (UTC, ISO 8601), ``level``, ``namespace``,
    ``message`` (the event formatted as in the text log) and the event's own
    named fields (``queue``, ``cause``, ``delay`` ...); a failure adds
    ``traceback``. Use it with ``twistd --logger consumer_svc.json_lines``: it
    writes where twistd's text log would (stdout with ``-n``, else ``--logfile``),
    from ``--log-level`` up.
    """
    stream = out if out is not None else _stream()

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

    return _at_level(observe)
