"""The fault proxy itself: real loopback sockets between a test client and an echo server."""

from __future__ import annotations

import builtins
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import pytest_twisted
from support import TESTS
from support.faultproxy import FaultProxy, Mode, Traffic
from support.waiting import eventually, within
from twisted.internet import error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

clock = cast(IReactorTime, reactor)
tcp = cast(IReactorTCP, reactor)

QUIET = 0.3  # how long "nothing happens" is watched for
WAIT = 5.0  # the deadline of every wait for something that should happen


def now() -> float:
    return clock.seconds()


async def quiet() -> None:
    """Let the reactor run for QUIET seconds: only to see that something does NOT happen."""
    await deferLater(clock, QUIET, lambda: None)


class Echo(Protocol):
    """Sends back what it receives and notes when it arrived."""

    def __init__(self, server: EchoServer) -> None:
        self.server = server

    def connectionMade(self) -> None:
        self.server.opened.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.server.arrivals.append((now(), data))
        self.tcp.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server.lost.append(reason)

    @property
    def tcp(self) -> ITCPTransport:
        return cast(ITCPTransport, self.transport)


class EchoServer(ServerFactory):
    """The target behind the proxy."""

    noisy = False

    def __init__(self) -> None:
        self.opened: list[Echo] = []
        self.lost: list[Failure] = []
        self.arrivals: list[tuple[float, bytes]] = []

    def buildProtocol(self, addr: IAddress | None) -> Echo:
        return Echo(self)

    @property
    def live(self) -> int:
        return len(self.opened) - len(self.lost)

    @property
    def received(self) -> bytes:
        return b"".join(data for _, data in self.arrivals)


class Client(Protocol):
    """A test client talking through the proxy."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.arrivals: list[tuple[float, bytes]] = []
        #: Fires with why the connection ended (``reason``'s exception), once it has.
        self.lost: Deferred[BaseException] = Deferred()
        self.reason: Failure | None = None

    @property
    def tcp(self) -> ITCPTransport:
        return cast(ITCPTransport, self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.arrivals.append((now(), data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        assert reason.value is not None  # a Failure holds its exception
        self.lost.callback(reason.value)  # not the Failure: that would make it an errback


class Net:
    """An echo server, a started proxy in front of it, and the clients of one test."""

    def __init__(self) -> None:
        self.echo = EchoServer()
        self.echo_port: IListeningPort = tcp.listenTCP(0, self.echo, interface="127.0.0.1")
        address = self.echo_port.getHost()
        assert isinstance(address, IPv4Address)
        self.proxy = FaultProxy("127.0.0.1", address.port)
        self.proxy.start()
        self.clients: list[Client] = []

    async def connect(self) -> Client:
        """Connect a new client through the proxy."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port, timeout=int(WAIT))
        connecting = cast("Deferred[Client]", connectProtocol(endpoint, Client()))
        client = await within(WAIT, connecting, "connect", cancel=True)
        self.clients.append(client)
        return client

    async def round_trip(self, client: Client, data: bytes) -> None:
        """Send ``data`` and wait until its echo is back."""
        expected = client.received + data
        client.tcp.write(data)
        await eventually(lambda: client.received == expected, WAIT, what=f"echo of {data!r}")

    async def stop_echo(self) -> None:
        """Close the echo server's port (the second time does nothing)."""
        stopped = self.echo_port.stopListening()
        if stopped is not None:
            await within(WAIT, stopped, "echo port closed")

    async def close(self) -> None:
        """Stop the proxy, close every socket of the test and wait until they are closed."""
        await within(WAIT, self.proxy.stop(), "proxy stop")
        for client in self.clients:
            client.tcp.abortConnection()
        for echo in self.echo.opened:
            echo.tcp.abortConnection()
        for client in self.clients:
            await within(WAIT, client.lost, "client closed")
        await self.stop_echo()
        await eventually(lambda: self.echo.live == 0, WAIT, what="echo connections closed")


@pytest_twisted.async_yield_fixture
async def net() -> AsyncIterator[Net]:
    """A proxy in PASS mode in front of an echo server; everything is closed afterwards."""
    n = Net()
    yield n
    await n.close()


def test_importing_installs_no_reactor() -> None:
    """Importing the module leaves the choice of reactor to whoever runs the tests."""
    code = "import sys, support.faultproxy; sys.exit('twisted.internet.reactor' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=TESTS, check=True, timeout=30)


def test_only_loopback_targets() -> None:
    """A target anywhere but on 127.0.0.1 is refused before anything listens."""
    with pytest.raises(ValueError, match=r"only proxies to 127\.0\.0\.1"):
        FaultProxy("10.0.0.1", 5672)


@pytest_twisted.ensureDeferred
async def test_bytes_pass_both_ways(net: Net) -> None:
    """In PASS mode what the client sends reaches the server, and the echo comes back."""
    client = await net.connect()
    await net.round_trip(client, b"hello")
    assert net.echo.received == b"hello"
    assert net.proxy.mode is Mode.PASS
    assert net.proxy.connection_count == 1
    assert net.proxy.bytes_forwarded == Traffic(upstream=5, downstream=5)
    assert net.proxy.bytes_dropped == Traffic(0, 0)


@pytest_twisted.ensureDeferred
async def test_blackhole_keeps_sockets_open_forwards_nothing_and_pass_resumes(net: Net) -> None:
    """A blackhole swallows bytes both ways without closing anything; PASS resumes, minus them."""
    client = await net.connect()
    await net.round_trip(client, b"before.")

    net.proxy.blackhole()
    client.tcp.write(b"lost-up.")
    net.echo.opened[0].tcp.write(b"lost-down.")
    await quiet()
    assert net.echo.received == b"before."
    assert client.received == b"before."
    assert client.reason is None
    assert net.echo.live == 1
    assert net.proxy.connection_count == 1
    assert net.proxy.bytes_dropped == Traffic(upstream=8, downstream=10)

    net.proxy.pass_traffic()
    await net.round_trip(client, b"after.")
    assert client.received == b"before.after."


@pytest_twisted.ensureDeferred
async def test_a_new_connection_while_blackholed_connects_but_carries_nothing(net: Net) -> None:
    """A client connecting into a blackhole gets a socket that says nothing until PASS."""
    net.proxy.blackhole()
    client = await net.connect()
    client.tcp.write(b"hello?")
    await quiet()
    assert client.received == b""
    assert net.echo.received == b""
    assert client.reason is None

    net.proxy.pass_traffic()
    await net.round_trip(client, b"now.")
    assert net.echo.received == b"now."


@pytest_twisted.ensureDeferred
async def test_a_stalled_blackhole_backs_the_writer_up_then_delivers_late(net: Net) -> None:
    """With stall=True the proxy stops reading, the client's buffers fill, and PASS drains them."""
    client = await net.connect()
    await net.round_trip(client, b"x")
    net.proxy.blackhole(stall=True)

    payload = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than the kernel buffers hold
    paused: list[bool] = []

    @implementer(IPushProducer)
    class Producer:
        def pauseProducing(self) -> None:
            paused.append(True)

        def resumeProducing(self) -> None:
            paused.append(False)

        def stopProducing(self) -> None:
            pass

    IConsumer(client.transport).registerProducer(Producer(), True)
    client.tcp.write(payload)
    await quiet()
    assert paused == [True], "the client's transport should still hold unsent bytes"
    assert net.echo.received == b"x"
    assert net.proxy.bytes_received.upstream == 1  # nothing read since the stall

    net.proxy.pass_traffic()
    await eventually(lambda: len(client.received) == 1 + len(payload), WAIT, what="echo of all")
    assert client.received == b"x" + payload
    assert paused == [True, False]
    IConsumer(client.transport).unregisterProducer()


@pytest_twisted.ensureDeferred
async def test_reset_all_aborts_both_sides(net: Net) -> None:
    """reset_all resets the client's and the server's sockets (RST, not FIN)."""
    client = await net.connect()
    await net.round_trip(client, b"hi")

    assert net.proxy.reset_all() == 1
    lost = await within(WAIT, client.lost, "client connectionLost")
    assert isinstance(lost, error.ConnectionLost), lost
    await eventually(lambda: net.echo.lost, WAIT, what="echo connectionLost")
    assert isinstance(net.echo.lost[0].value, error.ConnectionLost), net.echo.lost[0]
    await eventually(lambda: net.proxy.connection_count == 0, WAIT, what="no connections")


@pytest_twisted.ensureDeferred
async def test_an_end_is_passed_on_as_fin_and_held_back_by_a_blackhole(net: Net) -> None:
    """The server closing cleanly reaches the client as a clean close, but only after a blackhole."""
    client = await net.connect()
    await net.round_trip(client, b"hi")

    net.proxy.blackhole()
    net.echo.opened[0].tcp.loseConnection()
    await eventually(lambda: net.echo.lost, WAIT, what="echo connection closed")
    await quiet()
    assert client.reason is None

    net.proxy.pass_traffic()
    lost = await within(WAIT, client.lost, "client connectionLost")
    assert isinstance(lost, error.ConnectionDone), lost
    await eventually(lambda: net.proxy.connection_count == 0, WAIT, what="no connections")


@pytest_twisted.ensureDeferred
async def test_a_target_that_is_down_resets_the_client(net: Net) -> None:
    """When the upstream connect is refused, the accepted client is reset, not left waiting."""
    await net.stop_echo()
    client = await net.connect()
    lost = await within(WAIT, client.lost, "client connectionLost")
    assert isinstance(lost, error.ConnectionLost), lost
    await eventually(lambda: net.proxy.connection_count == 0, WAIT, what="no connections")


@pytest_twisted.ensureDeferred
async def test_refuse_fails_new_connects_and_spares_existing_ones(net: Net) -> None:
    """While refusing, connects fail at once but an established connection still echoes."""
    client = await net.connect()
    net.proxy.refuse()
    with pytest.raises(builtins.ConnectionRefusedError):  # at once, before the reactor runs
        socket.create_connection(("127.0.0.1", net.proxy.port), timeout=1).close()
    with pytest.raises(error.ConnectionRefusedError):
        await net.connect()
    await net.round_trip(client, b"still here")
    assert net.proxy.connection_count == 1

    net.proxy.pass_traffic()
    again = await net.connect()
    await net.round_trip(again, b"back")
    assert net.proxy.connection_count == 2


@pytest_twisted.ensureDeferred
async def test_hang_accepts_and_never_answers(net: Net) -> None:
    """A hung connection is accepted, never connected upstream, and stays hung after PASS."""
    await net.connect()
    net.proxy.hang()
    hung = await net.connect()
    hung.tcp.write(b"AMQP\x00\x00\x09\x01")
    await quiet()
    assert hung.received == b""
    assert hung.reason is None
    assert len(net.echo.opened) == 1  # only the first client's
    assert net.proxy.connection_count == 2

    net.proxy.pass_traffic()
    fresh = await net.connect()
    await net.round_trip(fresh, b"fresh")
    hung.tcp.write(b"anyone?")
    await quiet()
    assert hung.received == b""
    assert len(net.echo.opened) == 2


@pytest_twisted.ensureDeferred
async def test_latency_delays_each_direction(net: Net) -> None:
    """With latency L a chunk reaches the server after at least L, and its echo after 2 L."""
    client = await net.connect()
    net.proxy.latency = 0.15
    sent = now()
    await net.round_trip(client, b"ping")
    (reached, _), (back, _) = net.echo.arrivals[0], client.arrivals[0]
    assert reached - sent >= 0.15 - 1e-3
    assert back - sent >= 0.30 - 1e-3


@pytest_twisted.ensureDeferred
async def test_a_chunk_never_overtakes_an_earlier_one(net: Net) -> None:
    """Lowering the latency does not let a later chunk overtake one still delayed."""
    client = await net.connect()
    net.proxy.latency = 0.3
    sent = now()
    client.tcp.write(b"first.")
    await eventually(lambda: net.proxy.bytes_received.upstream == 6, WAIT, what="first read")
    net.proxy.latency = 0
    client.tcp.write(b"second.")
    await eventually(lambda: client.received == b"first.second.", WAIT, what="both echoed")
    assert net.echo.received == b"first.second."
    assert net.echo.arrivals[-1][0] - sent >= 0.3 - 1e-3


@pytest_twisted.ensureDeferred
async def test_stop_leaves_no_port_no_connection_and_no_timer(net: Net) -> None:
    """stop() closes the port, aborts every connection and cancels the proxy's timers."""
    before = set(clock.getDelayedCalls())
    delayed = await net.connect()
    net.proxy.latency = 10  # keeps a chunk, and its timer, inside the proxy
    delayed.tcp.write(b"slow")
    await eventually(lambda: net.proxy.bytes_received.upstream == 4, WAIT, what="chunk read")
    net.proxy.hang()
    hung = await net.connect()
    assert net.proxy.connection_count == 2

    await within(WAIT, net.proxy.stop(), "proxy stop")
    left: list[Any] = [call for call in clock.getDelayedCalls() if call not in before]
    assert left == []
    assert net.proxy.connection_count == 0
    with pytest.raises(error.ConnectionRefusedError):
        await net.connect()
    await within(WAIT, delayed.lost, "first client lost")
    await within(WAIT, hung.lost, "hung client lost")
    await eventually(lambda: net.echo.live == 0, WAIT, what="echo connection lost")
    assert net.echo.received == b""
