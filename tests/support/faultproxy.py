"""A TCP proxy that tests put between a client and a server on loopback to break the network.

:class:`FaultProxy` runs in the test process's reactor. It listens on ``127.0.0.1`` only,
connects only to ``127.0.0.1`` and, on command, passes traffic, swallows it (a dead link
that stays up), refuses new connections, leaves them hanging, resets everything or adds
latency. Importing this module does not import the reactor.

Written for Linux: there :meth:`FaultProxy.refuse` closes the port before it returns (by
``shutdown()`` of the listening socket); elsewhere the port closes one reactor iteration later.
"""

from __future__ import annotations

import contextlib
import enum
import socket
from collections import deque
from dataclasses import dataclass
from typing import Union, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ConnectionDone, NotConnectingError
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IFileDescriptor,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["Direction", "FaultProxy", "Mode", "Traffic"]

LOOPBACK = "127.0.0.1"

_log = Logger()

# What travels through a pipe: bytes, or how the sending side ended (passed on as FIN or RST).
_Item = Union[bytes, Failure]


class Mode(enum.Enum):
    """What the proxy does to traffic (see :class:`FaultProxy` for the details of each)."""

    PASS = "pass"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"
    HANG = "hang"


class Direction(enum.Enum):
    """Which way bytes travel through the proxy."""

    UPSTREAM = "upstream"  # from the client to the target
    DOWNSTREAM = "downstream"  # from the target back to the client


@dataclass(frozen=True)
class Traffic:
    """Byte counts per direction, summed over every connection the proxy has carried."""

    upstream: int
    downstream: int


class FaultProxy:
    """A loopback TCP proxy to ``target_host:target_port`` whose faults tests switch on.

    Every mode applies at once, to new connections and to established ones:

    * ``PASS`` (:meth:`pass_traffic`): new connections are connected upstream and bytes are
      forwarded both ways. Bytes swallowed while blackholed are *not* replayed: they are
      lost (see :meth:`blackhole` for the ``stall`` variant, where the kernel keeps them).
    * ``BLACKHOLE`` (:meth:`blackhole`): every socket stays open, nothing is forwarded.
    * ``REFUSE`` (:meth:`refuse`): the port is closed, so new connects fail with
      ``ECONNREFUSED``; established connections are untouched.
    * ``HANG`` (:meth:`hang`): new connections are accepted and never answered; established
      ones are untouched.

    Established connections forward in every mode but ``BLACKHOLE``. The end of one side
    (FIN or RST) is passed on to the other side in order after its bytes, as FIN or RST;
    while blackholed it is held back and passed on when the blackhole ends, like a
    retransmitted FIN. There is no flow control: the proxy reads as fast as it can and
    buffers what the other side has not taken yet.
    """

    def __init__(
        self, target_host: str, target_port: int, reactor: IReactorTCP | None = None
    ) -> None:
        """Prepare a proxy to ``target_host`` (``127.0.0.1`` or ``localhost`` only)."""
        if target_host not in (LOOPBACK, "localhost"):
            raise ValueError(f"FaultProxy only proxies to {LOOPBACK}, not to {target_host!r}")
        if not 0 < target_port < 65536:
            raise ValueError(f"not a TCP port: {target_port!r}")
        if reactor is None:
            # Imported late: pytest-twisted installs the reactor chosen with --reactor first.
            from twisted.internet import reactor as installed

            reactor = cast(IReactorTCP, installed)
        self.target_port = target_port
        self._tcp = reactor
        self._clock = IReactorTime(reactor)
        self._mode = Mode.PASS
        self._stall = False
        self._latency = 0.0
        self._port: int | None = None
        self._listener: IListeningPort | None = None
        self._closing: list[Deferred[None]] = []  # listening sockets not closed yet
        self._stopped = False
        self._links: dict[_Link, None] = {}  # ordered set of live connections
        self._idle: list[Deferred[None]] = []  # fired once no connection is left
        self._received = dict.fromkeys(Direction, 0)
        self._forwarded = dict.fromkeys(Direction, 0)
        self._dropped = dict.fromkeys(Direction, 0)
        self._factory = _ClientSideFactory(self)

    # Life cycle

    def start(self) -> int:
        """Listen on ``127.0.0.1`` on a free port and return that port (also :attr:`port`)."""
        if self._port is not None:
            raise RuntimeError("this FaultProxy has been started already")
        listener = self._tcp.listenTCP(0, self._factory, interface=LOOPBACK)
        self._listener = listener
        self._port = cast(IPv4Address, listener.getHost()).port
        self._apply_listening()  # a proxy told to refuse before it started closes its port
        return self._port

    def stop(self) -> Deferred[None]:
        """Stop listening and abort every connection; fire once all sockets are closed.

        Afterwards the proxy holds no socket and no pending ``DelayedCall``; it cannot be
        started again. Calling it twice is harmless.
        """
        self._stopped = True
        self._apply_listening()
        for link in list(self._links):
            link.reset()
        idle: Deferred[None] = Deferred()
        if self._links:
            self._idle.append(idle)
        else:
            idle.callback(None)
        done = gatherResults([*self._closing, idle], consumeErrors=True)
        return done.addCallback(lambda _: None)

    @property
    def port(self) -> int:
        """The port the proxy listens on (it keeps it while refusing)."""
        if self._port is None:
            raise RuntimeError("start() the FaultProxy first")
        return self._port

    # Faults

    @property
    def mode(self) -> Mode:
        """The current mode; change it with the methods named after each mode."""
        return self._mode

    def pass_traffic(self) -> None:
        """Forward bytes both ways and connect new connections upstream.

        Connections left hanging by :meth:`hang` stay hanging. Bytes swallowed by a
        blackhole are not replayed, unless it was a ``stall=True`` one (see :meth:`blackhole`).
        """
        self._switch(Mode.PASS)

    def blackhole(self, *, stall: bool = False) -> None:
        """Keep every socket open and forward nothing in either direction (a dead link).

        TCP stays up on both sides, so only heartbeats (or their absence) reveal it. New
        connections are accepted (the proxy's kernel answers the handshake) and connected
        upstream, but carry nothing. With ``stall=False`` the proxy keeps reading and drops
        what it reads, so the data is lost and the peers' writes never block. With
        ``stall=True`` it stops reading from every socket instead, so the peers' kernel
        buffers fill up as on a real dead link; what the kernels still hold when the
        blackhole ends is then delivered, late but intact, as TCP would after a short outage.
        Either way, chunks already inside the proxy (held back by :attr:`latency`) are dropped.
        """
        self._stall = stall
        self._switch(Mode.BLACKHOLE)

    def refuse(self) -> None:
        """Close the listening port, so new connects fail with ``ECONNREFUSED`` at once.

        This imitates a closed port better than accepting and resetting would: the client
        never sees a connection. Connections waiting in the accept queue are reset.
        Established connections are untouched. Leaving this mode listens on the same port.
        """
        self._switch(Mode.REFUSE)

    def hang(self) -> None:
        """Accept new connections but never connect them upstream nor answer them.

        What the client sends is read and dropped. Such a connection stays hung for its
        whole life, whatever the mode later; established connections are untouched.
        """
        self._switch(Mode.HANG)

    def reset_all(self) -> int:
        """Abort (RST) every client and upstream socket; return how many connections that was.

        The sockets close on the next reactor iteration; :attr:`connection_count` drops then.
        """
        count = sum(link.reset() for link in list(self._links))
        _log.info(
            "Fault proxy on port {port}: reset {count} connections", port=self._port, count=count
        )
        return count

    @property
    def latency(self) -> float:
        """Seconds added to every chunk in each direction, keeping their order (default 0)."""
        return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"latency must be 0 or more seconds, not {seconds!r}")
        self._latency = float(seconds)

    # Figures

    @property
    def connection_count(self) -> int:
        """Live proxied connections: accepted ones that still have an open socket."""
        return len(self._links)

    @property
    def bytes_received(self) -> Traffic:
        """Bytes read from the sockets, per direction (whatever became of them)."""
        return Traffic(self._received[Direction.UPSTREAM], self._received[Direction.DOWNSTREAM])

    @property
    def bytes_forwarded(self) -> Traffic:
        """Bytes written to the other side, per direction."""
        return Traffic(self._forwarded[Direction.UPSTREAM], self._forwarded[Direction.DOWNSTREAM])

    @property
    def bytes_dropped(self) -> Traffic:
        """Bytes read and thrown away (blackholed, hung, or for a side already gone)."""
        return Traffic(self._dropped[Direction.UPSTREAM], self._dropped[Direction.DOWNSTREAM])

    # Inside

    def _switch(self, mode: Mode) -> None:
        previous, self._mode = self._mode, mode
        try:
            self._apply_listening()
        except BaseException:
            self._mode = previous  # e.g. someone else took the port while we refused
            raise
        for link in list(self._links):
            if mode is not Mode.BLACKHOLE:
                link.release()
            link.update_reading()
        if mode is not previous:
            _log.info("Fault proxy on port {port}: {mode}", port=self._port, mode=mode.name)

    def _apply_listening(self) -> None:
        """Listen or not, as the mode says."""
        if self._port is None:
            return  # not started
        want = self._mode is not Mode.REFUSE and not self._stopped
        if want and self._listener is None:
            self._listener = self._tcp.listenTCP(self._port, self._factory, interface=LOOPBACK)
        elif not want and self._listener is not None:
            listener, self._listener = self._listener, None
            closed = listener.stopListening()
            # Twisted closes the socket on the next reactor iteration; until then the kernel
            # would still complete handshakes. Shutting a listening socket down for reading
            # makes Linux close it now (and frees the port at once).
            _stop_accepting(IFileDescriptor(listener).fileno())
            if closed is not None:
                self._closing.append(closed)
                closed.addBoth(self._closed, closed)

    def _closed(self, result: object, closed: Deferred[None]) -> object:
        self._closing.remove(closed)
        return result

    def _count(self, table: dict[Direction, int], direction: Direction, data: bytes) -> None:
        table[direction] += len(data)

    def _finished(self, link: _Link) -> None:
        del self._links[link]
        if not self._links:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)


def _stop_accepting(fd: int) -> None:
    """Close a listening socket's queue now; elsewhere than on Linux this may do nothing."""
    with contextlib.suppress(OSError), socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as s:
        s.shutdown(socket.SHUT_RD)  # acts on the socket, not on this duplicate descriptor


class _Side(Protocol):
    """One socket of a proxied connection: the accepted client, or the upstream one."""

    def __init__(self, link: _Link, direction: Direction) -> None:
        self.link = link
        self.direction = direction  # the way the bytes this side receives travel
        self.open = False
        self.ended = False
        self.closing = False  # we closed it; its connectionLost is on the way

    def connectionMade(self) -> None:
        self.open = True
        self.link.made(self)

    def dataReceived(self, data: bytes) -> None:
        self.link.received(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open, self.ended = False, True
        self.link.lost(self, reason)

    @property
    def tcp(self) -> ITCPTransport:
        return cast(ITCPTransport, self.transport)

    def write(self, data: bytes) -> bool:
        if not self.open or self.closing:
            return False
        self.tcp.write(data)
        return True

    def set_reading(self, reading: bool) -> None:
        if self.open and not self.closing:
            producer = IPushProducer(self.transport)
            if reading:
                producer.resumeProducing()
            else:
                producer.pauseProducing()

    def close_like(self, reason: Failure) -> None:
        """End this socket the way the other side ended: a clean close as FIN, else RST."""
        if self.open and not self.closing:
            self.closing = True
            if isinstance(reason.value, ConnectionDone):
                self.tcp.loseConnection()
            else:
                self.tcp.abortConnection()

    def abort(self) -> bool:
        if not self.open:
            return False
        self.closing = True
        self.tcp.abortConnection()
        return True


class _Pipe:
    """One direction of a connection: holds each chunk for the latency, in order, then writes it."""

    def __init__(self, link: _Link, direction: Direction) -> None:
        self.link = link
        self.direction = direction
        self.queue: deque[tuple[float, _Item]] = deque()
        self.timer: IDelayedCall | None = None
        self.held: Failure | None = None  # an end that arrived while blackholed

    def send(self, item: _Item) -> None:
        proxy = self.link.proxy
        if isinstance(item, bytes) and proxy.mode is Mode.BLACKHOLE:
            # Dropped as it arrives, so a latency longer than the blackhole cannot replay it.
            proxy._count(proxy._dropped, self.direction, item)
            return
        if proxy.latency <= 0 and not self.queue:
            self._deliver(item)
            return
        due = proxy._clock.seconds() + proxy.latency
        if self.queue:
            due = max(due, self.queue[-1][0])  # never overtake: order beats latency
        self.queue.append((due, item))
        self._schedule()

    def release(self) -> None:
        """Pass on an end held back while blackholed."""
        if self.held is not None:
            reason, self.held = self.held, None
            self.link.end_towards(self.direction, reason)

    def cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.queue.clear()
        self.held = None

    def _schedule(self) -> None:
        if self.timer is None and self.queue:
            clock = self.link.proxy._clock
            delay = max(0.0, self.queue[0][0] - clock.seconds())
            self.timer = clock.callLater(delay, self._due)

    def _due(self) -> None:
        self.timer = None
        now = self.link.proxy._clock.seconds()
        while self.queue and self.queue[0][0] <= now:
            self._deliver(self.queue.popleft()[1])
        self._schedule()

    def _deliver(self, item: _Item) -> None:
        proxy = self.link.proxy
        if isinstance(item, Failure):
            if proxy.mode is Mode.BLACKHOLE:
                self.held = item
            else:
                self.link.end_towards(self.direction, item)
            return
        target = self.link.side_towards(self.direction)
        written = proxy.mode is not Mode.BLACKHOLE and target is not None and target.write(item)
        proxy._count(proxy._forwarded if written else proxy._dropped, self.direction, item)


class _Link:
    """A proxied connection: the client's socket, the upstream one and a pipe each way."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, Direction.UPSTREAM)
        self.upstream: _Side | None = None
        self.connector: IConnector | None = None  # while connecting upstream
        self.hung = False
        self.pipes = {direction: _Pipe(self, direction) for direction in Direction}

    def made(self, side: _Side) -> None:
        proxy = self.proxy
        if side is self.client:
            proxy._links[self] = None
            if proxy.mode is Mode.HANG:
                self.hung = True
            else:
                factory = _UpstreamFactory(self)
                self.connector = proxy._tcp.connectTCP(LOOPBACK, proxy.target_port, factory)
        else:
            self.upstream, self.connector = side, None
        self.update_reading()

    def received(self, side: _Side, data: bytes) -> None:
        self.proxy._count(self.proxy._received, side.direction, data)
        if self.hung:
            self.proxy._count(self.proxy._dropped, side.direction, data)
        else:
            self.pipes[side.direction].send(data)

    def lost(self, side: _Side, reason: Failure) -> None:
        other = Direction.DOWNSTREAM if side.direction is Direction.UPSTREAM else Direction.UPSTREAM
        self.pipes[other].cancel()  # nothing can reach this side any more
        if not self.hung:
            self.pipes[side.direction].send(reason)
        self._check_finished()

    def upstream_failed(self, reason: Failure) -> None:
        self.connector = None
        self.pipes[Direction.DOWNSTREAM].send(reason)
        self._check_finished()

    def side_towards(self, direction: Direction) -> _Side | None:
        return self.upstream if direction is Direction.UPSTREAM else self.client

    def end_towards(self, direction: Direction, reason: Failure) -> None:
        """The other side ended: end this one too, or give up connecting it."""
        target = self.side_towards(direction)
        if target is not None:
            target.close_like(reason)
        elif direction is Direction.UPSTREAM:
            self._stop_connecting()

    def release(self) -> None:
        for pipe in self.pipes.values():
            pipe.release()

    def update_reading(self) -> None:
        stalled = self.proxy.mode is Mode.BLACKHOLE and self.proxy._stall
        # The client waits for the upstream connection before its bytes are read.
        self.client.set_reading(not stalled and self.connector is None)
        if self.upstream is not None:
            self.upstream.set_reading(not stalled)

    def reset(self) -> bool:
        """Abort both sockets; return whether there was anything left to abort."""
        aborted = self.client.abort()
        if self.upstream is not None:
            aborted = self.upstream.abort() or aborted
        aborted = self._stop_connecting() or aborted
        for pipe in self.pipes.values():
            pipe.cancel()
        return aborted

    def _stop_connecting(self) -> bool:
        connector, self.connector = self.connector, None
        if connector is None:
            return False
        try:
            connector.stopConnecting()  # calls clientConnectionFailed at once
        except NotConnectingError:
            return False
        return True

    def _check_finished(self) -> None:
        upstream_done = self.connector is None and (self.upstream is None or self.upstream.ended)
        if self.client.ended and upstream_done and self in self.proxy._links:
            for pipe in self.pipes.values():
                pipe.cancel()
            self.proxy._finished(self)


class _ClientSideFactory(ServerFactory):
    """Makes a connection for each accepted client."""

    noisy = False

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: IAddress | None) -> _Side | None:
        if self.proxy._stopped or self.proxy.mode is Mode.REFUSE:
            return None  # Twisted closes the socket
        return _Link(self.proxy).client


class _UpstreamFactory(ClientFactory[_Side]):
    """Connects one proxied connection to the target."""

    noisy = False

    def __init__(self, link: _Link) -> None:
        self.link = link

    def buildProtocol(self, addr: IAddress | None) -> _Side:
        return _Side(self.link, Direction.DOWNSTREAM)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.link.upstream_failed(reason)
