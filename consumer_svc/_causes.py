"""Why a connection ended (or never began), named from what pika and Twisted saw."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pika import exceptions as pika_errors
from twisted.internet import error as net_errors
from twisted.python.failure import Failure

from ._url import BrokerURL


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
