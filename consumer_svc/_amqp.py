"""The AMQP connection: pika's `TwistedProtocolConnection` under a `ReconnectingClientFactory`.

This is the one module that touches pika's Twisted adapter (importing it
installs the default reactor, so only `makeService` imports this module). It
adds what the adapter lacks: a handshake timeout, a teardown that cannot hang
on a peer that stopped reading, and the real cause of every lost connection.
Importing it also installs our field-table codec into pika (`_codec`).
"""

from __future__ import annotations

import enum
import os
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pika
import pika.credentials
from pika import exceptions as pika_errors
from pika import frame as pika_frame
from pika import spec
from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from twisted.internet import error as net_errors
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import ReconnectingClientFactory
from twisted.python.failure import Failure

from . import _codec
from ._backoff import Backoff
from ._settings import BrokerURL

# Headers pika cannot decode would drop the connection on every redelivery.
_codec.install()

#: Seconds an orderly TCP close may take before the socket is aborted.
TEARDOWN_GRACE = 5.0

#: Bytes asked of the socket per read. Twisted asks for 64 KiB, less than one 64 KiB
#: message with its frames; each read costs a system call, a pass of pika's decoding
#: and (here) one ack flush, so bigger bodies are cheaper read in bigger pieces.
READ_SIZE = 256 * 1024

_FRAME_HEAD = struct.Struct(">BHL")
_HEAD = _FRAME_HEAD.size  # type, channel, payload size
_FRAME_END = spec.FRAME_END
_METHOD_ID = struct.Struct(">I")
_CONTENT_HEADER = struct.Struct(">HHQ")


class FrameReader:
    """Cuts AMQP frames out of what the socket delivers, and hands each one to pika.

    pika's own loop (``Connection._on_data_available``) appends each read to one
    bytes buffer and cuts every frame off its front, copying the rest of the
    buffer once per frame, and copies each frame's payload once more: a 64 KiB
    body is copied four or five times on its way in. This reader walks the
    read by offset and keeps the tail of an incomplete frame as a view until
    the reads that complete it arrive: a body is copied once, out of the read
    (or out of the reads it spans, joined straight into the body). The frames
    it builds are pika's own, decoded by pika's own classes, and go to pika's
    ``_process_frame`` as before, with ``bytes_received`` counted as pika does
    (its heartbeat checker watches it).
    """

    def __init__(self, impl: Any) -> None:
        self._impl = impl
        #: The start of an incomplete frame: views of the reads it began in.
        self._pending: list[memoryview] = []
        self._pending_size = 0
        #: Bytes that frame needs in all (0 while its size is not known yet).
        self._needed = 0

    def __call__(self, data: bytes) -> None:
        offset = 0
        if self._pending:
            before, needed = self._pending_size, self._needed
            if before + len(data) < (needed or _HEAD):
                self._pending.append(memoryview(data))
                self._pending_size += len(data)
                return
            pending, self._pending, self._pending_size, self._needed = self._pending, [], 0, 0
            if not needed:
                # Not even the frame's size was there: start again on the joined bytes.
                data = b"".join([*pending, data])
            else:
                offset = needed - before  # the bytes of the pending frame in this read
                self._complete(pending, data, offset)
        self._frames(data, offset)

    def _complete(self, pending: list[memoryview], data: bytes, end: int) -> None:
        """The pending frame ends at ``end`` in ``data``: decode it, copying only its own bytes."""
        first = pending[0]
        if len(first) >= _HEAD and first[0] == spec.FRAME_BODY:
            # A body spanning reads is joined straight out of them: its one copy.
            if data[end - 1] != _FRAME_END:
                raise pika_errors.InvalidFrameError("Invalid FRAME_END marker")
            channel, payload = _FRAME_HEAD.unpack_from(first)[1:]
            fragment = b"".join([first[_HEAD:], *pending[1:], memoryview(data)[: end - 1]])
            self._deliver(_HEAD + payload + 1, pika_frame.Body(channel, fragment))
            return
        self._frames(b"".join([*pending, memoryview(data)[:end]]), 0)

    def _frames(self, data: bytes, offset: int) -> None:
        size = len(data)
        while offset < size:
            frame_type = data[offset]
            if frame_type not in _KNOWN_FRAMES:
                # The protocol header (a version mismatch) or garbage: pika's own decoder.
                consumed, header = pika_frame.decode_frame(data[offset:])
                if header is None:
                    self._keep(data, offset, 0)
                    return
                offset += consumed
                self._deliver(consumed, header)
                continue
            if size - offset < _HEAD:
                self._keep(data, offset, 0)
                return
            _, channel, payload = _FRAME_HEAD.unpack_from(data, offset)
            end = offset + _HEAD + payload + 1
            if end > size:
                self._keep(data, offset, end - offset)
                return
            if data[end - 1] != _FRAME_END:
                raise pika_errors.InvalidFrameError("Invalid FRAME_END marker")
            start = offset + _HEAD
            value: Any
            if frame_type == spec.FRAME_BODY:
                value = pika_frame.Body(channel, data[start : end - 1])
            elif frame_type == spec.FRAME_METHOD:
                method = spec.methods[_METHOD_ID.unpack_from(data, start)[0]]()
                method.decode(data[start : end - 1], 4)
                value = pika_frame.Method(channel, method)
            elif frame_type == spec.FRAME_HEADER:
                class_id, _weight, body_size = _CONTENT_HEADER.unpack_from(data, start)
                properties = spec.props[class_id]()
                properties.decode(data[start + 12 : end - 1])
                value = pika_frame.Header(channel, body_size, properties)
            else:
                value = pika_frame.Heartbeat()
            offset = end
            self._deliver(end - start + _HEAD, value)

    def _deliver(self, consumed: int, value: Any) -> None:
        impl = self._impl
        impl.bytes_received += consumed
        impl._process_frame(value)

    def _keep(self, data: bytes, offset: int, needed: int) -> None:
        view = memoryview(data)[offset:]
        self._pending = [view]
        self._pending_size = len(view)
        self._needed = needed


_KNOWN_FRAMES = frozenset(
    {spec.FRAME_METHOD, spec.FRAME_HEADER, spec.FRAME_BODY, spec.FRAME_HEARTBEAT}
)


class HandshakeTimeout(Exception):
    """The broker accepted TCP but did not finish the AMQP handshake in time."""


class Lost(enum.Enum):
    """Why a connection ended (or never began)."""

    CONNECT_FAILED = "could not connect"
    HANDSHAKE_TIMEOUT = "AMQP handshake timed out"
    ACCESS_REFUSED = "access refused"
    VHOST_REFUSED = "virtual host refused"
    CLOSED_BY_BROKER = "closed by the broker"
    HEARTBEAT_TIMEOUT = "heartbeat timeout"
    CONNECTION_LOST = "connection lost"
    TLS_FAILED = "TLS failed"
    CLOSED_BY_US = "closed by us"


#: Causes that retrying cannot fix.
FATAL = frozenset({Lost.ACCESS_REFUSED, Lost.VHOST_REFUSED})


@dataclass(frozen=True)
class Cause:
    """Why a connection ended, in words an operator can act on."""

    kind: Lost
    detail: str

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}" if self.detail else self.kind.value


def _describe(value: BaseException) -> str:
    text = str(value).strip()
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


def classify(
    *, opened: bool, first_error: BaseException | None, reason: BaseException | None, url: BrokerURL
) -> Cause:
    """Name the cause of a lost connection from what pika and Twisted saw.

    ``first_error`` is the first error pika meant to terminate the stream
    with (it holds the broker's Connection.Close reply code and text, which
    pika's adapter later overwrites); ``reason`` is Twisted's connectionLost
    reason.
    """
    if isinstance(first_error, pika_errors.ConnectionClosedByBroker):
        code, text = first_error.reply_code, first_error.reply_text
        if code == 403:
            return Cause(
                Lost.ACCESS_REFUSED,
                f"{text} (user {url.username!r}, vhost {url.vhost!r}, {url.host}:{url.port})",
            )
        if code == 530:
            return Cause(Lost.VHOST_REFUSED, f"{text} (user {url.username!r}, vhost {url.vhost!r})")
        return Cause(Lost.CLOSED_BY_BROKER, f"{code} {text}")
    if isinstance(first_error, pika_errors.AMQPHeartbeatTimeout):
        return Cause(
            Lost.HEARTBEAT_TIMEOUT, "no frame from the broker in time: " + str(first_error)
        )
    if isinstance(first_error, HandshakeTimeout):
        return Cause(Lost.HANDSHAKE_TIMEOUT, str(first_error))
    if isinstance(first_error, pika_errors.ConnectionClosedByClient):
        return Cause(Lost.CLOSED_BY_US, "")
    if reason is not None and not isinstance(reason, net_errors.ConnectionDone):
        module = type(reason).__module__
        if module.startswith("service_identity"):
            errors = getattr(reason, "errors", ())
            kinds = ", ".join(type(e).__name__ for e in errors) or type(reason).__name__
            return Cause(
                Lost.TLS_FAILED,
                f"the broker's certificate is not valid for {url.host!r} ({kinds})",
            )
        if module.startswith("OpenSSL"):
            text = _describe(reason)
            if "wrong version number" in text or "packet length too long" in text:
                # The classic amqps:// to a plain AMQP port: the "server hello" is AMQP bytes.
                return Cause(
                    Lost.TLS_FAILED,
                    f"{url.host}:{url.port} does not seem to speak TLS (is it a plain amqp:// "
                    f"port? RabbitMQ's TLS port is 5671 by default) ({text})",
                )
            return Cause(Lost.TLS_FAILED, text)
        return Cause(Lost.CONNECTION_LOST, _describe(reason))
    if not opened:
        return Cause(Lost.CONNECTION_LOST, "the broker closed the connection during the handshake")
    return Cause(Lost.CONNECTION_LOST, "the broker closed the TCP connection")


def connect_failure(reason: Failure) -> Cause:
    """The cause of a TCP connect that failed."""
    value = reason.value
    if isinstance(value, net_errors.ConnectionRefusedError):
        return Cause(Lost.CONNECT_FAILED, "connection refused")
    if isinstance(value, net_errors.TimeoutError):
        return Cause(Lost.CONNECT_FAILED, "TCP connect timed out")
    if isinstance(value, net_errors.DNSLookupError):
        return Cause(Lost.CONNECT_FAILED, "host name not found")
    return Cause(Lost.CONNECT_FAILED, reason.getErrorMessage())


def connection_parameters(
    url: BrokerURL, *, heartbeat: int, name: str, client_certificate: bool = False
) -> pika.ConnectionParameters:
    """pika's parameters; host, port and TLS are Twisted's business, not pika's.

    An amqps:// URL without credentials, with a client certificate, logs in
    with EXTERNAL: the broker takes the user from the certificate.
    """
    credentials: Any = pika.PlainCredentials(url.username, url.password)
    if url.external_login(client_certificate):
        credentials = pika.credentials.ExternalCredentials()
    return pika.ConnectionParameters(
        virtual_host=url.vhost,
        credentials=credentials,
        heartbeat=heartbeat,
        client_properties={
            "connection_name": f"{name} on {socket.gethostname()} pid {os.getpid()}",
            "product": "consumer_svc",
        },
    )


class ConnectionListener(Protocol):
    """What the connection tells its owner."""

    def amqp_connecting(self) -> None:
        """A connection attempt (TCP, then AMQP) starts."""

    def amqp_ready(self, connection: AMQPConnection) -> None:
        """The AMQP handshake finished: channels may be opened."""

    def amqp_lost(self, connection: AMQPConnection | None, cause: Cause) -> None:
        """The connection ended, or (with ``None``) a TCP connect failed."""

    def amqp_retrying(self, delay: float, attempt: int) -> None:
        """A reconnect is scheduled in ``delay`` seconds."""

    def amqp_blocked(self, blocked: bool, reason: str) -> None:
        """The broker blocked (resource alarm) or unblocked the connection."""


class AMQPConnection(TwistedProtocolConnection):
    """pika's protocol, with a handshake timeout, a bounded teardown and a named cause."""

    def __init__(
        self,
        parameters: pika.ConnectionParameters,
        *,
        listener: ConnectionListener,
        clock: IReactorTime,
        url: BrokerURL,
        handshake_timeout: float,
    ) -> None:
        super().__init__(parameters, custom_reactor=clock)
        self._listener = listener
        self._clock = clock
        self._url = url
        self._handshake_timeout = handshake_timeout
        self._timer: IDelayedCall | None = None
        self._first_error: BaseException | None = None
        self._waiting_for_loss: list[Deferred[None]] = []
        self._reading = False
        self._after_read: list[Callable[[], None]] = []
        self.opened = False
        self.lost = False
        assert self.ready is not None
        self.ready.addErrback(self._handshake_failed)
        impl: Any = self._impl
        terminate = impl._terminate_stream

        def terminate_stream(error: BaseException | None) -> None:
            # pika's adapter replaces this error with ConnectionDone later on;
            # keep the first one: it holds the broker's reply code and text.
            if error is not None and self._first_error is None:
                self._first_error = error
            terminate(error)

        impl._terminate_stream = terminate_stream
        impl._adapter_disconnect_stream = self._disconnect_stream
        impl._on_data_available = FrameReader(impl)
        impl.add_on_connection_blocked_callback(self._on_blocked)
        impl.add_on_connection_unblocked_callback(self._on_unblocked)

    # -- lifecycle

    def connectionMade(self) -> None:
        # As pika does for the transports it makes itself: acks are small
        # writes that must not wait for the broker's TCP acknowledgement.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        if isinstance(self.transport, FileDescriptor):
            # Plain TCP only: under TLS our transport is the TLS layer, which reads the
            # socket itself and hands on what it decrypted in pieces of up to 32 KiB.
            self.transport.bufferSize = READ_SIZE
        self._timer = self._clock.callLater(self._handshake_timeout, self._handshake_expired)

    def connectionReady(self) -> AMQPConnection:
        self._cancel_timer()
        self.opened = True
        self._listener.amqp_ready(self)
        return self

    def _handshake_failed(self, failure: Failure) -> None:
        # Before the handshake finished, the cause is reported by
        # connectionLost; after it, this is an error in amqp_ready itself.
        if self.opened:
            failure.raiseException()

    def _handshake_expired(self) -> None:
        self._timer = None
        self._first_error = HandshakeTimeout(
            f"no AMQP handshake within {self._handshake_timeout:g}s from {self._url.host}:{self._url.port}"
        )
        if self.transport is not None:
            self.transport.abortConnection()

    def _disconnect_stream(self) -> None:
        """pika wants the TCP connection closed: close it, abort it if it does not close."""
        if self.transport is None or self.lost:
            return
        if isinstance(self._first_error, pika_errors.AMQPHeartbeatTimeout):
            # The peer is presumed dead: waiting for our buffer to drain would
            # wait forever if it stopped reading.
            self.transport.abortConnection()
            return
        self.transport.loseConnection()
        self._cancel_timer()
        self._timer = self._clock.callLater(TEARDOWN_GRACE, self._abort)

    def _abort(self) -> None:
        self._timer = None
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = net_errors.ConnectionDone) -> None:  # type: ignore[assignment]
        self._cancel_timer()
        self.lost = True
        try:
            super().connectionLost(reason)
        finally:
            value = reason.value if isinstance(reason, Failure) else None
            cause = classify(
                opened=self.opened, first_error=self._first_error, reason=value, url=self._url
            )
            waiting, self._waiting_for_loss = self._waiting_for_loss, []
            self._listener.amqp_lost(self, cause)
            for d in waiting:
                d.callback(None)

    def shutdown(self, timeout: float) -> Deferred[None]:
        """Close with a proper AMQP Connection.Close; abort if it takes over ``timeout`` s.

        Fires once the TCP connection is gone.
        """
        if self.lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting_for_loss.append(d)
        impl: Any = self._impl
        if self._first_error is None:
            self._first_error = pika_errors.ConnectionClosedByClient(200, "consumer_svc stopping")
        if self.opened and not (impl.is_closing or impl.is_closed):
            impl.close(200, "consumer_svc stopping")
            self._cancel_timer()
            self._timer = self._clock.callLater(timeout, self._abort)
        else:
            self._abort()
        return d

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        self._reading = True
        try:
            super().dataReceived(data)
        finally:
            self._reading = False
            after, self._after_read = self._after_read, []
            for call in after:
                call()

    def soon(self, call: Callable[[], None]) -> None:
        """Call ``call`` once the bytes being read now are processed, else on the next reactor turn.

        Whatever handlers finish while one read is processed (every synchronous
        one) is settled in one go at its end, before the reactor polls again.
        """
        if self._reading:
            self._after_read.append(call)
        else:
            self._clock.callLater(0, call)

    # -- broker flow control

    def _on_blocked(self, _connection: object, frame: Any) -> None:
        self._listener.amqp_blocked(True, str(frame.method.reason))

    def _on_unblocked(self, _connection: object, _frame: object) -> None:
        self._listener.amqp_blocked(False, "")

    # -- channels

    def open_channel(self) -> Deferred[Channel]:
        """A new channel, wrapped."""
        d: Deferred[Any] = self.channel()
        return d.addCallback(Channel, self.soon)


class AMQPFactory(ReconnectingClientFactory):
    """Builds `AMQPConnection`s and reconnects with our `Backoff` after any loss.

    With several broker URLs (a cluster), a failed attempt moves on to the
    next URL at once, and the backoff applies per full round of the list.
    `succeeded` resets the backoff; the owner calls it only once the consumer
    is registered, never on a bare TCP connect, so a broker that keeps
    refusing us is retried ever more slowly.
    """

    noisy = False

    def __init__(
        self,
        urls: Sequence[BrokerURL],
        parameters: Callable[[BrokerURL], pika.ConnectionParameters],
        *,
        listener: ConnectionListener,
        reactor: Any,
        backoff: Backoff,
        random: Callable[[], float],
        timeout: float,
        tls: Callable[[BrokerURL], Any] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("no broker URL")
        self.urls = list(urls)
        self.parameters = parameters
        self.listener = listener
        self.reactor = reactor
        self.clock = reactor  # ReconnectingClientFactory's own attribute
        self.backoff = backoff
        self.random = random
        self.timeout = timeout
        self.tls = tls
        self.index = 0
        self.initialDelay = self.delay = backoff.initial
        self.maxDelay = backoff.maximum  # type: ignore[assignment]

    @property
    def url(self) -> BrokerURL:
        """The URL of the current (or last) attempt."""
        return self.urls[self.index]

    def connect(self) -> IConnector:
        """Start an attempt on the current URL (TCP, or TLS for amqps://)."""
        url = self.url
        connector: IConnector
        if url.tls:
            assert self.tls is not None
            connector = self.reactor.connectSSL(
                url.host, url.port, self, self.tls(url), timeout=self.timeout
            )
        else:
            connector = self.reactor.connectTCP(url.host, url.port, self, timeout=self.timeout)
        self.connector = connector
        return connector

    def buildProtocol(self, addr: IAddress | None) -> AMQPConnection:
        connection = AMQPConnection(
            self.parameters(self.url),
            listener=self.listener,
            clock=self.reactor,
            url=self.url,
            handshake_timeout=self.timeout,
        )
        connection.factory = self
        return connection

    def startedConnecting(self, connector: IConnector) -> None:
        self.listener.amqp_connecting()

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.listener.amqp_lost(None, connect_failure(reason))
        super().clientConnectionFailed(connector, reason)

    def retry(self, connector: IConnector | None = None) -> None:
        if not self.continueTrying:
            return
        self.index = (self.index + 1) % len(self.urls)
        if self.index == 0:  # a full round failed: back off
            self.retries += 1
            self.delay = self.backoff.delay(self.retries, self.random)
        else:
            self.delay = 0.0
        self._callID = self.reactor.callLater(self.delay, self._reconnect)
        self.listener.amqp_retrying(self.delay, self.retries)

    def _reconnect(self) -> None:
        self._callID = None
        self.connect()

    def succeeded(self) -> None:
        """The consumer is registered: the next failure starts the backoff afresh."""
        self.retries = 0
        self.delay = self.backoff.initial


class Channel:
    """The few channel operations the consumer needs, with pika's quirks contained.

    Declarations go through pika's `TwistedChannel` (its RPC Deferreds fail
    when the channel closes); consuming uses the plain pika channel so that a
    delivery costs a function call, not a Deferred.
    """

    def __init__(self, channel: TwistedChannel, soon: Callable[[Callable[[], None]], None]) -> None:
        self._twisted: Any = channel
        #: Runs a call at the end of the current read, or on the next reactor turn.
        self.soon = soon
        self._pika: Any = channel._channel
        self._pending: set[Deferred[Any]] = set()
        self.closed: Deferred[BaseException] = Deferred()
        self.close_reason: BaseException | None = None
        self.on_cancelled: Callable[[], None] | None = None
        channel.on_closed.addCallback(self._on_closed)
        self._pika.add_on_cancel_callback(self._on_cancel)

    @property
    def number(self) -> int:
        return int(self._pika.channel_number)

    @property
    def is_open(self) -> bool:
        return bool(self._pika.is_open)

    def _on_closed(self, reason: BaseException) -> None:
        self.close_reason = reason
        pending, self._pending = self._pending, set()
        for d in pending:
            d.errback(reason)
        self.closed.callback(reason)

    def _on_cancel(self, _frame: object) -> None:
        if self.on_cancelled is not None:
            self.on_cancelled()

    def _rpc(self, start: Callable[[Callable[[Any], None]], None]) -> Deferred[Any]:
        if not self.is_open:
            return fail(
                self.close_reason or pika_errors.ChannelWrongStateError("channel is closed")
            )
        d: Deferred[Any] = Deferred()
        self._pending.add(d)

        def done(result: Any) -> None:
            if d in self._pending:
                self._pending.discard(d)
                d.callback(result)

        try:
            start(done)
        except Exception:
            self._pending.discard(d)
            return fail()
        return d

    def declare_queue(
        self, queue: str, *, passive: bool = False, arguments: Mapping[str, Any]
    ) -> Deferred[Any]:
        """Declare a durable queue (or, passively, check that it exists)."""
        d: Deferred[Any] = self._twisted.queue_declare(
            queue=queue, passive=passive, durable=True, arguments=dict(arguments) or None
        )
        return d

    def declare_exchange(self, exchange: str, exchange_type: str) -> Deferred[Any]:
        d: Deferred[Any] = self._twisted.exchange_declare(
            exchange=exchange, exchange_type=exchange_type, durable=True
        )
        return d

    def bind(self, queue: str, exchange: str, routing_key: str) -> Deferred[Any]:
        d: Deferred[Any] = self._twisted.queue_bind(
            queue=queue, exchange=exchange, routing_key=routing_key
        )
        return d

    def qos(self, prefetch: int) -> Deferred[Any]:
        # Per consumer, never global: RabbitMQ 4.3 rejects global QoS.
        d: Deferred[Any] = self._twisted.basic_qos(prefetch_count=prefetch, global_qos=False)
        return d

    def confirm(self) -> Deferred[Any]:
        """Put the channel in publisher-confirm mode."""
        d: Deferred[Any] = self._twisted.confirm_delivery()
        return d

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.BasicProperties | None,
        *,
        mandatory: bool,
    ) -> Deferred[Any]:
        """Publish; in confirm mode the Deferred fires on the broker's ack."""
        d: Deferred[Any] = self._twisted.basic_publish(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            properties=properties,
            mandatory=mandatory,
        )
        return d

    def consume(
        self, queue: str, on_message: Callable[[Channel, Any, spec.BasicProperties, bytes], None]
    ) -> Deferred[str]:
        """Start consuming; fires with the consumer tag once the broker confirmed it."""

        def deliver(_channel: object, method: Any, properties: Any, body: bytes) -> None:
            on_message(self, method, properties, body)

        return self._rpc(
            lambda done: self._pika.basic_consume(
                queue,
                deliver,
                auto_ack=False,
                callback=lambda frame: done(frame.method.consumer_tag),
            )
        )

    def cancel(self, consumer_tag: str) -> Deferred[Any]:
        return self._rpc(lambda done: self._pika.basic_cancel(consumer_tag, callback=done))

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._pika.basic_ack(delivery_tag, multiple)

    def nack(self, delivery_tag: int, requeue: bool = True) -> None:
        self._pika.basic_nack(delivery_tag, False, requeue)

    def reject(self, delivery_tag: int, requeue: bool = False) -> None:
        self._pika.basic_reject(delivery_tag, requeue)

    def close(self) -> None:
        if self.is_open:
            self._pika.close()
