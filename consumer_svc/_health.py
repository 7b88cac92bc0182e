"""Health probes and Prometheus metrics over HTTP: /healthz, /readyz, /metrics.

The HTTP side is a deliberately tiny server, not twisted.web: one GET or HEAD
per connection, no request body ever read, a cap on connections and a
deadline on each, so that whatever a client sends costs a bounded amount of
memory and no file descriptors beyond the cap.

Metrics live in a registry of the service's own (not prometheus-client's
global one), so that several services in one process never collide.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString
from twisted.application.internet import TCPServer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._errors import ListenFailed
from ._outcome import Outcome

log = Logger(namespace="consumer_svc")

#: Outcomes that end with an ack on the wire.
ACKED = (Outcome.ACKED, Outcome.RETRIED, Outcome.DEAD_LETTERED)


class _PerMessage:
    """The per-message figures as plain numbers; prometheus-client reads them when scraped.

    Settling a message then costs a dictionary increment and a bucket
    increment instead of a labelled Counter and a Histogram update (each with
    its own lock): about 1.5 us per message less (``python -m benchmarks.path``).
    No lock is needed: settling and /metrics both run on the reactor thread.
    """

    def __init__(self, buckets: Sequence[float]) -> None:
        self.settled: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self.bounds = tuple(buckets)
        #: Observations per bucket, not cumulative; the last one is +Inf.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        messages = CounterMetricFamily(
            "consumer_messages", "Messages settled, by outcome.", labels=["outcome"]
        )
        for outcome, count in self.settled.items():
            messages.add_metric([outcome.value], count)
        yield messages
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(
            "consumer_handler_seconds",
            "How long handlers took, successful or not.",
            buckets=buckets,
            sum_value=self.sum,
        )


class Metrics:
    """The service's metrics (names and labels are documented in README.md)."""

    def __init__(self, inflight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._per_message = _PerMessage(
            (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600)
        )
        self.registry.register(self._per_message)
        self._settled = self._per_message.settled
        #: Record how long one handler took, in seconds.
        self.handled = self._per_message.observe
        self.inflight = Gauge(
            "consumer_inflight", "Messages being handled or settled.", registry=self.registry
        )
        self.inflight.set_function(lambda: float(inflight()))
        self.connections = Counter(
            "consumer_connections", "Successful AMQP connections.", registry=self.registry
        )
        self.connected = Gauge(
            "consumer_connected", "1 while connected to the broker.", registry=self.registry
        )
        self.reconnect_delay = Gauge(
            "consumer_reconnect_delay_seconds",
            "The current reconnect backoff (0 while connected).",
            registry=self.registry,
        )
        self.paused = Gauge(
            "consumer_paused",
            "1 while the consumer is paused (a failing downstream, or the operator).",
            registry=self.registry,
        )
        self.pauses = Counter(
            "consumer_pauses", "Times the consumer paused.", registry=self.registry
        )
        self.last_ack = Gauge(
            "consumer_last_ack_timestamp_seconds",
            "Unix time of the last ack sent.",
            registry=self.registry,
        )
        # Read when scraped; the per-message path only stores a float.
        self._last_ack = 0.0
        self.last_ack.set_function(lambda: self._last_ack)

    def settled(self, outcome: Outcome) -> None:
        self._settled[outcome] += 1
        if outcome in ACKED:
            self._last_ack = time.time()

    def render(self) -> bytes:
        return generate_latest(self.registry)


#: Connections served at once; any more are closed as soon as they are accepted.
MAX_CONNECTIONS = 32
#: Seconds a connection may stay open, from accept to the last byte of the answer.
CONNECTION_TIMEOUT = 10.0
#: Bytes the request line and headers together may take.
MAX_REQUEST_HEAD = 8192

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_TEXT = b"text/plain; charset=utf-8"

#: What a path answers: status, content type and body, computed per request.
Answer = Callable[[], tuple[int, bytes, bytes]]


class _ProbeProtocol(Protocol):
    """One HTTP/1.x request, one answer with ``Connection: close``, then the connection ends."""

    def __init__(self, factory: HealthFactory) -> None:
        self._factory = factory
        self._buffer = b""
        self._answered = False
        self._counted = False
        self._deadline: IDelayedCall | None = None

    @property
    def _tcp(self) -> ITCPTransport:
        return cast(ITCPTransport, self.transport)

    def connectionMade(self) -> None:
        factory = self._factory
        if factory.open >= factory.max_connections:
            self._answered = True
            self._tcp.abortConnection()
            return
        factory.open += 1
        self._counted = True
        # Covers a client that never finishes its request and one that never reads the answer.
        self._deadline = factory.clock.callLater(factory.timeout, self._tcp.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or end > MAX_REQUEST_HEAD:
            if len(self._buffer) > MAX_REQUEST_HEAD:
                self._answer(431, _TEXT, b"request head too large\n")
            return
        head, self._buffer = self._buffer[:end], b""
        self._respond(head)

    def _respond(self, head: bytes) -> None:
        request_line, *header_lines = head.split(b"\r\n")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._answer(400, _TEXT, b"bad request\n")
            return
        method, target, _ = parts
        headers: dict[bytes, bytes] = {}
        for line in header_lines:
            name, sep, value = line.partition(b":")
            if not sep:
                self._answer(400, _TEXT, b"bad request\n")
                return
            headers[name.strip().lower()] = value.strip()
        if b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0":
            # Refused unread: nothing of the body is ever taken off the socket.
            self._answer(413, _TEXT, b"request bodies are not accepted\n")
            return
        if method not in (b"GET", b"HEAD"):
            self._answer(405, _TEXT, b"only GET and HEAD\n", extra=b"Allow: GET, HEAD\r\n")
            return
        answer = self._factory.paths.get(target.split(b"?", 1)[0])
        if answer is None:
            self._answer(404, _TEXT, b"not found\n")
            return
        code, content_type, body = answer()
        self._answer(code, content_type, body, head_only=method == b"HEAD")

    def _answer(
        self,
        code: int,
        content_type: bytes,
        body: bytes,
        *,
        head_only: bool = False,
        extra: bytes = b"",
    ) -> None:
        self._answered = True
        self._buffer = b""
        status = f"HTTP/1.1 {code} {_REASONS.get(code, 'Unknown')}\r\n".encode()
        self._tcp.write(
            status
            + b"Content-Type: "
            + content_type
            + f"\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Cache-Control: no-store\r\nConnection: close\r\n"
            + extra
            + b"\r\n"
            + (b"" if head_only else body)
        )
        # Stops reading too: whatever else the client sends (pipelined requests, a body)
        # stays in the kernel's buffers and is dropped with the socket.
        self._tcp.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self._counted:
            self._counted = False
            self._factory.open -= 1


class HealthFactory(Factory):
    """The health port's protocol factory: routes paths to answers and bounds what clients cost."""

    noisy = False

    def __init__(
        self,
        paths: dict[bytes, Answer],
        *,
        clock: IReactorTime | None = None,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = CONNECTION_TIMEOUT,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self.clock = clock
        self.paths = paths
        self.max_connections = max_connections
        self.timeout = timeout
        #: Connections being served now.
        self.open = 0

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return _ProbeProtocol(self)


def health_site(
    metrics: Metrics,
    ready: Callable[[], tuple[bool, str]],
    *,
    clock: IReactorTime | None = None,
) -> HealthFactory:
    """The probe and metrics endpoints.

    /healthz answers 200 whenever the reactor can answer at all (liveness);
    /readyz answers 200 only while connected and consuming, else 503 with the
    state; /metrics is Prometheus's text format.
    """

    def readyz() -> tuple[int, bytes, bytes]:
        ok, state = ready()
        return (200 if ok else 503), _TEXT, f"{state}\n".encode()

    return HealthFactory(
        {
            b"/healthz": lambda: (200, _TEXT, b"ok\n"),
            b"/readyz": readyz,
            b"/metrics": lambda: (200, CONTENT_TYPE_LATEST.encode(), metrics.render()),
        },
        clock=clock,
    )


class HealthServer(TCPServer):
    """The health port as a twistd service: a port it cannot listen on ends the start in one line."""

    def __init__(self, host: str, port: int, factory: HealthFactory) -> None:
        super().__init__(port, factory, interface=host)
        self.host, self.port = host, port

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            cause = e.socketError
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
            address = f"[{self.host}]" if ":" in self.host else self.host
            give_up_at_start(
                ListenFailed(
                    f"--health-port: cannot listen on {address}:{self.port}: "
                    f"{reason[:1].lower()}{reason[1:]}"
                )
            )


def give_up_at_start(error: ListenFailed) -> None:
    """Log ``error`` in one line and end twistd's start with its exit status, without a traceback.

    Raised before the reactor runs, the error lets twistd remove its pidfile and
    tell a daemon's parent; the traceback Python would print is left out, and an
    atexit hook applies the exit status (twistd cannot choose one).
    """
    log.critical(
        "Giving up, retrying cannot fix this: {reason} (exit status {status})",
        reason=str(error),
        status=int(error.status),
    )
    previous = sys.excepthook

    def quiet(kind: type[BaseException], value: BaseException, tb: object) -> None:
        if value is not error:
            previous(kind, value, tb)  # type: ignore[arg-type]

    def hard_exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(error.status))

    sys.excepthook = quiet
    atexit.register(hard_exit)
    raise error
