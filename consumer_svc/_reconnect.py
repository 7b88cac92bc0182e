"""Reconnecting: a `ReconnectingClientFactory` driven by our `Backoff`, round a cluster's URLs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pika
from twisted.internet.interfaces import IAddress, IConnector
from twisted.internet.protocol import ReconnectingClientFactory
from twisted.python.failure import Failure

from ._backoff import Backoff
from ._causes import connect_failure
from ._connection import AMQPConnection, ConnectionListener
from ._url import BrokerURL


class AMQPFactory(ReconnectingClientFactory):
    """Builds `AMQPConnection`s and reconnects with our `Backoff` after any loss.

    With several broker URLs (a cluster), a failed attempt moves on to the
    next URL at once, and the backoff applies per full round of the list.
    `succeeded` resets the backoff; the owner calls it only once the consumer
    is registered, never on a bare TCP connect, so a broker that keeps
    refusing us is retried ever more slowly.

    What it takes over from `ReconnectingClientFactory`, and why: `retry`
    is replaced whole, because the delay comes from `Backoff` (a pure
    function with its randomness injected, tested by value) and the next
    attempt may go to another URL; the parent's own schedule (``factor``,
    ``jitter``, ``maxRetries``, ``initialDelay``, ``maxDelay``) is unused.
    What it keeps of the parent: ``continueTrying`` and ``stopTrying``
    (which cancels the pending attempt and stops the connector),
    ``connector``, ``retries`` and ``delay`` (read by tests and metrics),
    ``clock``, and ``clientConnectionLost``/``clientConnectionFailed``
    calling `retry`. The one private name it writes is ``_callID``: the
    pending attempt, which the parent's ``stopTrying`` cancels.
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
        self.delay = backoff.initial

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
