"""The connection's own logic, without a broker: causes, backoff, timeouts, teardown."""

from __future__ import annotations

from typing import Any

import pika
import pytest
from pika import exceptions as pika_errors
from pika import frame, spec
from twisted.internet import error as net_errors
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from consumer_svc._amqp import (
    TEARDOWN_GRACE,
    AMQPConnection,
    AMQPFactory,
    Cause,
    FrameReader,
    HandshakeTimeout,
    Lost,
    classify,
    connection_parameters,
)
from consumer_svc._backoff import Backoff
from consumer_svc._settings import parse_url

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
    assert not transport.disconnected
    clock.advance(0.2)
    assert transport.disconnected
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
    assert not transport.disconnected
    clock.advance(TEARDOWN_GRACE)
    assert transport.disconnected
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
    factory = make_factory(reactor, listener)  # type: ignore[arg-type]
    waits = []
    for _ in range(5):
        factory.clientConnectionFailed(None, Failure(net_errors.ConnectionRefusedError()))  # type: ignore[arg-type]
        [call] = reactor.getDelayedCalls()
        waits.append(call.getTime() - reactor.seconds())
        reactor.advance(call.getTime() - reactor.seconds())
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert len(reactor.tcpClients) == 5
    assert [c.kind for c in listener.causes()] == [Lost.CONNECT_FAILED] * 5
    factory.succeeded()
    factory.clientConnectionLost(None, Failure(net_errors.ConnectionDone()))  # type: ignore[arg-type]
    assert reactor.getDelayedCalls()[0].getTime() - reactor.seconds() == 1.0


def test_a_cluster_is_tried_node_by_node_and_backs_off_per_round() -> None:
    """With two URLs a failure moves to the other node at once; only a failed round waits."""
    reactor, listener = MemoryReactorClock(), Listener()
    factory = make_factory(reactor, listener, ("amqp://u:p@node1:5672/", "amqp://u:p@node2:5673/"))  # type: ignore[arg-type]
    factory.connect()
    tried, waits = [], []
    for _ in range(4):
        tried.append((reactor.tcpClients[-1][0], reactor.tcpClients[-1][1]))
        factory.clientConnectionFailed(None, Failure(net_errors.ConnectionRefusedError()))  # type: ignore[arg-type]
        [call] = reactor.getDelayedCalls()
        waits.append(call.getTime() - reactor.seconds())
        reactor.advance(call.getTime() - reactor.seconds())
    assert tried == [("node1", 5672), ("node2", 5673), ("node1", 5672), ("node2", 5673)]
    assert waits == [0.0, 1.0, 0.0, 2.0]


def test_stop_trying_cancels_the_pending_reconnect() -> None:
    """After stopTrying no reconnect is left scheduled, and no new one is made."""
    reactor, listener = MemoryReactorClock(), Listener()
    factory = make_factory(reactor, listener)  # type: ignore[arg-type]
    factory.clientConnectionFailed(None, Failure(net_errors.ConnectionRefusedError()))  # type: ignore[arg-type]
    factory.stopTrying()
    assert reactor.getDelayedCalls() == []
    factory.clientConnectionLost(None, Failure(net_errors.ConnectionDone()))  # type: ignore[arg-type]
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
            connection.soon(lambda n=n: events.append(f"flush {n}"))

    impl: Any = connection._impl
    impl.data_received = pika_processes
    connection.dataReceived(b"two deliveries")
    assert events == ["handled 1", "handled 2", "flush 1", "flush 2"]

    events.clear()
    connection.soon(lambda: events.append("flush 3"))  # a handler finished on a timer or thread
    assert events == []
    clock.advance(0)
    assert events == ["flush 3"]


class FrameSink:
    """Just what FrameReader uses of pika's connection: the byte count and _process_frame."""

    def __init__(self) -> None:
        self.bytes_received = 0
        self.frames: list[tuple[Any, ...]] = []

    def _process_frame(self, value: Any) -> None:
        if isinstance(value, frame.Body):
            self.frames.append(("body", value.channel_number, bytes(value.fragment)))
        elif isinstance(value, frame.Header):
            properties = value.properties
            self.frames.append(
                (
                    "header",
                    value.channel_number,
                    value.body_size,
                    properties.headers,
                    properties.message_id,
                )
            )
        elif isinstance(value, frame.Method):
            self.frames.append(
                ("method", value.channel_number, type(value.method).__name__, vars(value.method))
            )
        else:
            self.frames.append((type(value).__name__,))


def some_frames() -> bytes:
    """Deliveries of bodies from empty to 200,000 bytes, each followed by a heartbeat."""
    pieces: list[bytes] = []
    for tag, size in enumerate((0, 1, 100, 64 * 1024, 3, 200_000, 7), start=1):
        body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
        deliver = spec.Basic.Deliver("ctag", tag, False, "", "q")
        properties = spec.BasicProperties(message_id=f"m{tag}", headers={"n": tag, "s": "x" * tag})
        pieces.append(frame.Method(1, deliver).marshal())
        pieces.append(frame.Header(1, len(body), properties).marshal())
        if body:
            pieces.append(frame.Body(1, body).marshal())
        pieces.append(frame.Heartbeat().marshal())
    return b"".join(pieces)


def pika_decodes(data: bytes) -> FrameSink:
    """What pika's own decoder makes of ``data``, frame by frame."""
    sink, offset = FrameSink(), 0
    while offset < len(data):
        consumed, value = frame.decode_frame(data[offset:])
        assert value is not None
        offset += consumed
        sink.bytes_received += consumed
        sink._process_frame(value)
    return sink


@pytest.mark.parametrize("chunk", [1, 6, 7, 8, 13, 1000, 65_536, 262_144, 10_000_000])
def test_frames_read_in_any_pieces_decode_as_pikas_own_decoder_does(chunk: int) -> None:
    """Reads that end anywhere, inside a frame head or a body, give pika the very same frames."""
    data = some_frames()
    expected = pika_decodes(data)
    sink = FrameSink()
    reader = FrameReader(sink)
    for start in range(0, len(data), chunk):
        reader(data[start : start + chunk])
    assert sink.frames == expected.frames
    assert sink.bytes_received == expected.bytes_received == len(data)


def test_uneven_reads_decode_as_pikas_own_decoder_does() -> None:
    """Reads of ever-changing sizes, a frame's head split over several, give the same frames."""
    data = some_frames()
    expected = pika_decodes(data)
    sink = FrameSink()
    reader = FrameReader(sink)
    sizes = [3, 70_000, 5, 1, 1, 140_000, 2, 9, 65_531]
    start, n = 0, 0
    while start < len(data):
        size = sizes[n % len(sizes)]
        reader(data[start : start + size])
        start, n = start + size, n + 1
    assert sink.frames == expected.frames
    assert sink.bytes_received == len(data)


def test_a_bad_frame_end_is_an_invalid_frame() -> None:
    """A frame whose end marker is wrong is an error, whole in one read or split over two."""
    data = bytearray(frame.Heartbeat().marshal())
    data[-1] = 0
    with pytest.raises(pika_errors.InvalidFrameError):
        FrameReader(FrameSink())(bytes(data))
    body = bytearray(frame.Body(1, b"x" * 1000).marshal())
    body[-1] = 0
    reader = FrameReader(FrameSink())
    reader(bytes(body[:500]))
    with pytest.raises(pika_errors.InvalidFrameError):
        reader(bytes(body[500:]))


def test_a_protocol_header_split_over_reads_is_decoded_by_pika() -> None:
    """The broker's protocol header (its answer to a version it does not speak) still reaches pika."""
    data = frame.ProtocolHeader().marshal()
    sink = FrameSink()
    reader = FrameReader(sink)
    reader(data[:3])
    reader(data[3:])
    assert sink.frames == [("ProtocolHeader",)]
    assert sink.bytes_received == len(data)
