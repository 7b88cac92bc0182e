"""A real `Consumer` on the testing kit's fakes and a Clock: what the unit tests share.

`SETTINGS` are the options of those tests; `Scripted` is a handler whose results each test
decides. The consumer calls it through the real `Invoker` (``consumer_svc.testing._fakes.invoker``),
so nothing here stands in for a part of the service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consumer_svc import Message
from consumer_svc._settings import Settings
from consumer_svc._url import parse_url

__all__ = ["SETTINGS", "Scripted"]

SETTINGS = Settings(
    url=parse_url("amqp://localhost"),
    queue="q",
    dead_letter_queue="q.dead",
    max_retries=2,
    retry_delay=5.0,
    stall_check=0,
)


class Scripted:
    """A handler whose results the test decides, message by message; it notes each delivery tag.

    Log lines name it ``tests.handler``, as they name a handler by its module and qualified name.
    """

    def __init__(self, behaviour: Callable[[Message], Any]) -> None:
        self.behaviour = behaviour
        self.seen: list[int] = []
        self.__module__ = "tests"
        self.__qualname__ = "handler"

    def __call__(self, message: Message) -> Any:
        self.seen.append(message.delivery_tag)
        return self.behaviour(message)
