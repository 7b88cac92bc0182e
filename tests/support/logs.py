"""Capturing log events in tests, as the service's own observers see them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer

__all__ = ["Logs", "captured"]


@implementer(ILogObserver)
class Logs:
    """Keeps every log event it observes, and gives them as formatted lines."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def text(self) -> str:
        return "\n".join(self.lines())


@contextlib.contextmanager
def captured() -> Iterator[Logs]:
    """The events published to the global log publisher while the ``with`` block runs."""
    logs = Logs()
    globalLogPublisher.addObserver(logs)
    try:
        yield logs
    finally:
        globalLogPublisher.removeObserver(logs)
