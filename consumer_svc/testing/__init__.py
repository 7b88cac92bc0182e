"""consumer_svc.testing: test handlers by the service's own rules, with or without a broker.

Without a broker: build a message with `message`, run a handler on it with a `Runner`
(the service's real consumer and invoker, on fakes and a `task.Clock`) and assert on the
`Result`: its `Outcome` (acked, retried and where to, parked and why, handed back) and the
publishes it made, each answered as a `Confirm` says.

With a broker: the pytest plugin of this package (``rabbitmq_node``, ``rabbitmq_url``,
``rabbitmq_factory``) starts throwaway RabbitMQ nodes; `consumer_svc.testing.rabbitmq` is the
harness behind it.

The names load on first use: importing this package (as pytest does for the plugin) must not
import pika's Twisted adapter, which would install the default reactor before pytest-twisted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._fakes import FakeChannel, FakeConnection
    from ._kit import Confirm, Incoming, Outcome, Parked, Publish, Result, Retried, Runner, message

__all__ = [
    "Confirm",
    "FakeChannel",
    "FakeConnection",
    "Incoming",
    "Outcome",
    "Parked",
    "Publish",
    "Result",
    "Retried",
    "Runner",
    "message",
]

_HOMES = {"FakeChannel": "._fakes", "FakeConnection": "._fakes"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES.get(name, "._kit"), __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
