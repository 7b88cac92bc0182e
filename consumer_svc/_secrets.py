"""The one redaction point: every text the service writes goes through `redact`.

It masks the password of every URL it sees (whole, even one with a raw ``@``)
and every password the process knows — each one `parse_url` read — wherever it
appears: a handler's exception text, a traceback, a header of a parked copy, a
status line. `install` puts `redact_event` first among the log observers, so
the text log, JSON lines and any other observer only see masked events.
"""

from __future__ import annotations

import re
from typing import Any, cast
from urllib.parse import quote

from twisted.logger import ILogObserver, LogEvent, LogPublisher, globalLogPublisher
from twisted.python.failure import Failure

MASK = "***"
#: Shorter passwords are masked inside URLs only: masking two or three letters
#: wherever they appear would garble every line.
MIN_LENGTH = 4
#: RabbitMQ's well-known default: no secret, and it is also the user's name.
_PUBLIC = frozenset({"", "guest"})

#: scheme://user:PASSWORD@ — the password runs to the last "@" before the path, as
#: urlsplit reads it, so a raw "@" in it is masked with the rest.
_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^\s/]*@", re.I)

_known: set[str] = set()
_pattern: re.Pattern[str] | None = None


def remember(password: str) -> None:
    """Mask ``password`` (and its percent-encoded form) in everything written from now on."""
    global _pattern
    if password in _PUBLIC or len(password) < MIN_LENGTH:
        return
    forms = {password, quote(password, safe=""), repr(password)[1:-1]}
    if forms <= _known:
        return
    _known.update(forms)
    # Longest first, so that no shorter form leaves part of a longer one behind.
    _pattern = re.compile("|".join(re.escape(f) for f in sorted(_known, key=len, reverse=True)))


def redact(text: str) -> str:
    """``text`` with every URL's password and every known password replaced by ``***``."""
    text = _PASSWORD_IN_URL.sub(rf"\g<head>{MASK}@", text)
    if _pattern is not None:
        text = _pattern.sub(MASK, text)
    return text


class _Masked:
    """Stands in for a log field whose text shows a password: formats as the masked text."""

    def __init__(self, value: object) -> None:
        self._str = redact(str(value))
        self._repr = redact(repr(value))

    def __str__(self) -> str:
        return self._str

    def __repr__(self) -> str:
        return self._repr

    def __format__(self, spec: str) -> str:
        return format(self._str, spec)


class _RedactedFailure(Failure):
    """A copy of a failure whose traceback and message are masked."""

    def getTraceback(self, *args: Any, **kwargs: Any) -> str:
        return redact(super().getTraceback(*args, **kwargs))

    def getErrorMessage(self) -> str:
        return redact(super().getErrorMessage())

    def getBriefTraceback(self) -> str:
        return redact(super().getBriefTraceback())

    def __str__(self) -> str:
        return redact(super().__str__())


def redact_failure(failure: Failure) -> Failure:
    """A masked copy of ``failure`` (the original is left as it is)."""
    if isinstance(failure, _RedactedFailure):
        return failure
    copy = _RedactedFailure.__new__(_RedactedFailure)
    copy.__dict__.update(failure.__dict__)
    return copy


def _mask(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, tuple):  # legacy events' "message"
        return tuple(_mask(v) for v in value)
    try:
        text, shown = str(value), repr(value)
    except Exception:
        return value
    return _Masked(value) if redact(text) != text or redact(shown) != shown else value


def redact_event(event: LogEvent) -> None:
    """Mask ``event`` in place: its format, its fields and its failure's traceback."""
    for key, value in list(event.items()):
        if key == "log_failure" and isinstance(value, Failure):
            event[key] = redact_failure(value)
        elif key.startswith("log_") and key not in ("log_format", "log_text", "log_io"):
            continue
        else:
            masked = _mask(value)
            if masked is not value and masked != value:
                event[key] = masked


def install(publisher: LogPublisher = globalLogPublisher) -> None:
    """Make `redact_event` the first observer of ``publisher``, once.

    The first: an event is one dict handed to each observer in turn, so the
    ones after it (twistd's text log, JSON lines) only ever see it masked.
    LogPublisher has no public way to insert an observer first.
    """
    observers: list[Any] | None = getattr(publisher, "_observers", None)
    if observers is None:
        # A future Twisted without the list: at least the observers added later see masks.
        publisher.addObserver(cast(ILogObserver, redact_event))
        return
    if redact_event not in observers:
        observers.insert(0, redact_event)
