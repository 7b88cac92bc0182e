"""The AMQP connection: pika's `TwistedProtocolConnection`, with what the adapter lacks.

A handshake timeout, a teardown that cannot hang on a peer that stopped
reading, acks flushed at the end of each read (`soon`), and the real cause of
every lost connection (`_causes`), told to a `ConnectionListener`; frames
are cut out of each read by `_frames.FrameReader`. This module
and `_reconnect` are the ones that touch pika's Twisted adapter (importing it
installs the default reactor, so only `makeService` imports them). Importing
it also installs our field-table codec into pika (`_codec`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pika
from pika import exceptions as pika_errors
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import error as net_errors
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.python.failure import Failure

from . import _codec, _frames
from ._causes import Cause, HandshakeTimeout, classify
from ._channel import Channel
from ._url import BrokerURL

# Headers pika cannot decode would drop the connection on every redelivery.
_codec.install()

#: Seconds an orderly TCP close may take before the socket is aborted.
TEARDOWN_GRACE = 5.0


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
        impl._on_data_available = _frames.FrameReader(impl)
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
            self.transport.bufferSize = _frames.READ_SIZE
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
