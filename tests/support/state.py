"""Reading state a test has just changed, through a call.

A test asserts a state, acts, and asserts the next one: ``assert not d.called``,
``clock.advance(1)``, ``assert d.called``. mypy keeps what the first assert told it about an
attribute past the call that changes it (python/mypy#11969, by design) and calls the second
assert unreachable. Read through one of these, and each assert sees the attribute as it is.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

__all__ = ["aborted", "fired"]


def fired(d: Deferred[Any]) -> bool:
    """Whether ``d`` has its result (``d.called``)."""
    return d.called


def aborted(transport: StringTransport) -> bool:
    """Whether the connection on ``transport`` was aborted (``transport.disconnected``)."""
    return transport.disconnected
