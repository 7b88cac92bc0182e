"""Stopping on a clock, without a broker: the close gets what is left of the deadline, and the stop
ends by it.
"""

from __future__ import annotations

import pytest
from support.service_support import settings_for
from support.state import fired
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from consumer_svc._service import STOP_GRACE, ConsumerService
from consumer_svc._states import State
from consumer_svc.testing import FakeConnection


class StuckConnection(FakeConnection):
    """A connection whose close handshake never finishes, recording what it is asked."""

    def __init__(self) -> None:
        super().__init__()
        self.socket = StringTransport()
        self.transport = self.socket

    def shutdown(self, timeout: float) -> Deferred[None]:
        self.shutdowns.append(timeout)
        return Deferred()


def stopping_service(shutdown_timeout: float) -> tuple[ConsumerService, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    settings = settings_for("amqp://u:p@broker/", "q", shutdown_timeout=shutdown_timeout)
    service = ConsumerService(settings, lambda m: None, reactor=reactor, exit=lambda status: None)
    service.startService()
    return service, reactor


def test_the_close_gets_what_is_left_of_the_stop_not_a_fixed_few_seconds() -> None:
    """With nothing in flight, the close handshake (which carries the acks owed) may take all of --shutdown-timeout + grace."""
    service, _reactor = stopping_service(shutdown_timeout=30)
    connection = StuckConnection()
    service._connection = connection
    service.stopService()
    [timeout] = connection.shutdowns
    assert 30 < timeout <= 30 + STOP_GRACE


def test_a_stop_whose_close_never_finishes_ends_at_the_deadline() -> None:
    """A close that never completes is aborted and the stop ends at --shutdown-timeout + grace, under 5 s more."""
    service, reactor = stopping_service(shutdown_timeout=10)
    connection = StuckConnection()
    service._connection = connection
    stopped = service.stopService()
    reactor.advance(10 + STOP_GRACE - 0.01)
    assert not fired(stopped)
    reactor.advance(0.02)
    assert fired(stopped)
    assert connection.socket.disconnected  # aborted
    assert service.state is State.STOPPED
    assert STOP_GRACE < 5
    assert reactor.getDelayedCalls() == []


def test_hurry_cuts_the_drain_short_and_bounds_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second signal hands back what is in flight at once, and the stop ends within 5 s of it."""
    service, reactor = stopping_service(shutdown_timeout=300)
    connection = StuckConnection()
    service._connection = connection
    gave_up: list[bool] = []
    monkeypatch.setattr(service.consumer, "hurry", lambda: gave_up.append(True))
    stopped = service.stopService()
    reactor.advance(1)
    service.hurry("SIGTERM")
    assert gave_up == [True]
    reactor.advance(5)
    assert stopped.called
