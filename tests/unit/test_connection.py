"""The connection's own logic, without a broker: causes, backoff, timeouts, teardown."""

from __future__ import annotations

import functools
from typing import Any

import pika
import pytest
from pika import exceptions as pika_errors
from pika import frame, spec
from support.state import aborted
from twisted.internet import error as net_errors
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IAddress, IConnector
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from consumer_svc._backoff import Backoff
from consumer_svc._causes import Cause, HandshakeTimeout, Lost, classify
from consumer_svc._connection import TEARDOWN_GRACE, AMQPConnection
from consumer_svc._parameters import connection_parameters
from consumer_svc._reconnect import AMQPFactory
from consumer_svc._url import parse_url

URL = parse_url("amqp://alice:s3cret@broker:5672/orders")


class Listener:
    """Records what the connection reports."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def amqp_connecting(self) -> None:
        self.events.append(("connecting", None))

    def amqp_ready(self, connection: AMQPConnection) -> None:
        self.events.append(("ready", connection))

    def amqp_lost(self, connection: AMQPConnection | None, cause: Cause) -> None:
        self.events.append(("lost", cause))

    def amqp_retrying(self, delay: float, attempt: int) -> None:
        self.events.append(("retrying", (delay, attempt)))

    def amqp_blocked(self, blocked: bool, reason: str) -> None:
        self.events.append(("blocked", (blocked, reason)))

    def causes(self) -> list[Cause]:
        return [value for kind, value in self.events if kind == "lost"]


@implementer(IConnector)
class Connector:
    """The connector of a failed or lost attempt: the factory only keeps it, to stop it."""

    def stopConnecting(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def connect(self) -> None:
        pass

    def getDestination(self) -> IAddress:
        return IPv4Address("TCP", "broker", 5672)


CONNECTOR = Connector()


def make_factory(clock: Clock, listener: Listener, urls: tuple[str, ...] = ()) -> AMQPFactory:
    return AMQPFactory(
        [parse_url(u) for u in urls] or [URL],
        lambda url: connection_parameters(url, heartbeat=10, name="test"),
        listener=listener,
        reactor=clock,
        backoff=Backoff(initial=1.0, maximum=8.0),
        random=lambda: 0.0,
        timeout=15.0,
    )


def connected(clock: Clock, listener: Listener) -> tuple[AMQPConnection, StringTransport]:
    connection = make_factory(clock, listener).buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)
    return connection, transport


def broker_says(connection: AMQPConnection, method: Any) -> None:
    connection.dataReceived(frame.Method(0, method).marshal())


@pytest.mark.parametrize(
    ("first_error", "reason", "kind", "fatal"),
    [
        (pika_errors.ConnectionClosedByBroker(403, "ACCESS_REFUSED - Login was refused"), None, Lost.ACCESS_REFUSED, True),
        (pika_errors.ConnectionClosedByBroker(530, "NOT_ALLOWED - vhost orders not found"), None, Lost.VHOST_REFUSED, True),
        (pika_errors.ConnectionClosedByBroker(320, "CONNECTION_FORCED - broker forced connection closure"), None, Lost.CLOSED_BY_BROKER, False),
        (pika_errors.AMQPHeartbeatTimeout("no activity"), None, Lost.HEARTBEAT_TIMEOUT, False),
        (HandshakeTimeout("no handshake"), None, Lost.HANDSHAKE_TIMEOUT, False),
        (pika_errors.ConnectionClosedByClient(200, "bye"), None, Lost.CLOSED_BY_US, False),
        (None, net_errors.ConnectionLost("reset by peer"), Lost.CONNECTION_LOST, False),
        (None, net_errors.ConnectionDone(), Lost.CONNECTION_LOST, False),
    ],
)  # fmt: skip
def test_each_cause_is_named(
    first_error: Exception | None, reason: Exception | None, kind: Lost, fatal: bool
) -> None:
    """What pika and Twisted saw maps to one named cause, fatal only when retrying cannot help."""
    cause = classify(opened=True, first_error=first_error, reason=reason, url=URL)
    assert (cause.kind, cause.fatal) == (kind, fatal)


def test_an_access_refusal_names_user_and_vhost_but_not_the_password() -> None:
    """The operator reads who was refused where; the password stays out."""
    error = pika_errors.ConnectionClosedByBroker(403, "ACCESS_REFUSED - Login was refused")
    text = str(classify(opened=False, first_error=error, reason=None, url=URL))
    assert "ACCESS_REFUSED" in text
    assert "'alice'" in text
    assert "'orders'" in text
    assert "s3cret" not in text


def test_the_broker_close_frame_survives_pikas_adapter() -> None:
    """A Connection.Close 403 during the handshake is reported as ACCESS_REFUSED, not AMQPConnectionError(1)."""
    clock, listener = Clock(), Listener()
    connection, transport = connected(clock, listener)
    broker_says(connection, spec.Connection.Close(403, "ACCESS_REFUSED - Login was refused", 0, 0))
    assert transport.disconnecting
    connection.connectionLost(Failure(net_errors.ConnectionDone()))
    [cause] = listener.causes()
    assert cause.kind is Lost.ACCESS_REFUSED
    assert cause.fatal


def test_a_silent_peer_times_out_the_handshake() -> None:
    """A TCP peer that never speaks AMQP is aborted after the handshake timeout."""
    clock, listener = Clock(), Listener()
    connection, transport = connected(clock, listener)
    clock.advance(14.9)
    assert not aborted(transport)
    clock.advance(0.2)
    assert aborted(transport)
    connection.connectionLost(Failure(net_errors.ConnectionAborted()))
    [cause] = listener.causes()
    assert cause.kind is Lost.HANDSHAKE_TIMEOUT
    assert clock.getDelayedCalls() == []


def test_teardown_aborts_a_peer_that_stopped_reading() -> None:
    """An orderly close that does not complete is aborted after the grace period."""
    clock, listener = Clock(), Listener()
    connection, transport = connected(clock, listener)
    broker_says(connection, spec.Connection.Close(320, "CONNECTION_FORCED - shutdown", 0, 0))
    assert transport.disconnecting
    assert not aborted(transport)
    clock.advance(TEARDOWN_GRACE)
    assert aborted(transport)
    connection.connectionLost(Failure(net_errors.ConnectionAborted()))
    assert listener.causes()[0].kind is Lost.CLOSED_BY_BROKER
    assert clock.getDelayedCalls() == []


def test_a_heartbeat_timeout_aborts_at_once() -> None:
    """When the peer is presumed dead, the socket is aborted, not politely drained."""
    clock, listener = Clock(), Listener()
    connection, transport = connected(clock, listener)
    impl: Any = connection._impl
    impl._terminate_stream(pika_errors.AMQPHeartbeatTimeout("no frame for 20s"))
    assert transport.disconnected
    connection.connectionLost(Failure(net_errors.ConnectionDone()))
    assert listener.causes()[0].kind is Lost.HEARTBEAT_TIMEOUT


def test_reconnects_back_off_and_reset_only_when_told() -> None:
    """Failed attempts wait 1, 2, 4, 8, 8 s; `succeeded` starts the schedule over."""
    reactor, listener = MemoryReactorClock(), Listener()
    factory = make_factory(reactor, listener)
    waits = []
    for _ in range(5):
        factory.clientConnectionFailed(CONNECTOR, Failure(net_errors.ConnectionRefusedError()))
        [call] = reactor.getDelayedCalls()
        waits.append(call.getTime() - reactor.seconds())
        reactor.advance(call.getTime() - reactor.seconds())
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert len(reactor.tcpClients) == 5
    assert [c.kind for c in listener.causes()] == [Lost.CONNECT_FAILED] * 5
    factory.succeeded()
    factory.clientConnectionLost(CONNECTOR, Failure(net_errors.ConnectionDone()))
    assert reactor.getDelayedCalls()[0].getTime() - reactor.seconds() == 1.0


def test_a_cluster_is_tried_node_by_node_and_backs_off_per_round() -> None:
    """With two URLs a failure moves to the other node at once; only a failed round waits."""
    reactor, listener = MemoryReactorClock(), Listener()
    factory = make_factory(reactor, listener, ("amqp://u:p@node1:5672/", "amqp://u:p@node2:5673/"))
    factory.connect()
    tried, waits = [], []
    for _ in range(4):
        tried.append((reactor.tcpClients[-1][0], reactor.tcpClients[-1][1]))
        factory.clientConnectionFailed(CONNECTOR, Failure(net_errors.ConnectionRefusedError()))
        [call] = reactor.getDelayedCalls()
        waits.append(call.getTime() - reactor.seconds())
        reactor.advance(call.getTime() - reactor.seconds())
    assert tried == [("node1", 5672), ("node2", 5673), ("node1", 5672), ("node2", 5673)]
    assert waits == [0.0, 1.0, 0.0, 2.0]


def test_stop_trying_cancels_the_pending_reconnect() -> None:
    """After stopTrying no reconnect is left scheduled, and no new one is made."""
    reactor, listener = MemoryReactorClock(), Listener()
    factory = make_factory(reactor, listener)
    factory.clientConnectionFailed(CONNECTOR, Failure(net_errors.ConnectionRefusedError()))
    factory.stopTrying()
    assert reactor.getDelayedCalls() == []
    factory.clientConnectionLost(CONNECTOR, Failure(net_errors.ConnectionDone()))
    assert reactor.getDelayedCalls() == []


def test_connection_parameters_carry_credentials_and_a_name() -> None:
    """pika gets the vhost, the credentials, the heartbeat and a connection name for the management UI."""
    params = connection_parameters(URL, heartbeat=7, name="consumer_svc q")
    assert isinstance(params.credentials, pika.PlainCredentials)
    assert (params.virtual_host, params.heartbeat, params.credentials.username) == (
        "orders",
        7,
        "alice",
    )
    assert params.client_properties["connection_name"].startswith("consumer_svc q on ")


def test_what_finishes_during_a_read_is_flushed_at_its_end_and_the_rest_on_the_next_turn() -> None:
    """Synchronous handlers' acks leave together, right after the read that brought their messages."""
    clock, listener = Clock(), Listener()
    connection, _ = connected(clock, listener)
    events: list[str] = []

    def pika_processes(data: bytes) -> None:  # pika decodes the frames and runs each handler
        for n in (1, 2):
            events.append(f"handled {n}")
            connection.soon(functools.partial(events.append, f"flush {n}"))

    impl: Any = connection._impl
    impl.data_received = pika_processes
    connection.dataReceived(b"two deliveries")
    assert events == ["handled 1", "handled 2", "flush 1", "flush 2"]

    events.clear()
    connection.soon(lambda: events.append("flush 3"))  # a handler finished on a timer or thread
    assert events == []
    clock.advance(0)
    assert events == ["flush 3"]
