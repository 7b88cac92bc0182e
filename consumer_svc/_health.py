"""Health probes and Prometheus metrics over HTTP: /healthz, /readyz, /metrics.

Metrics live in a registry of the service's own (not prometheus-client's
global one), so that several services in one process never collide.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

#: Outcomes that end with an ack on the wire.
ACKED = ("acked", "retried", "dead_lettered")


class Metrics:
    """The service's metrics (names and labels are documented in README.md)."""

    def __init__(self, inflight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter(
            "consumer_messages",
            "Messages settled, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        # Children looked up once (present at 0 from the start), not per message.
        self._by_outcome = {
            outcome: self.messages.labels(outcome)
            for outcome in ("acked", "rejected", "retried", "dead_lettered", "requeued")
        }
        self.handler_seconds = Histogram(
            "consumer_handler_seconds",
            "How long handlers took, successful or not.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600),
            registry=self.registry,
        )
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
        self.last_ack = Gauge(
            "consumer_last_ack_timestamp_seconds",
            "Unix time of the last ack sent.",
            registry=self.registry,
        )
        # Read when scraped; the per-message path only stores a float.
        self._last_ack = 0.0
        self.last_ack.set_function(lambda: self._last_ack)

    def settled(self, outcome: str) -> None:
        self._by_outcome[outcome].inc()
        if outcome in ACKED:
            self._last_ack = time.time()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Text(Resource):
    isLeaf = True

    def __init__(self, answer: Callable[[], tuple[int, bytes, bytes]]) -> None:
        super().__init__()
        self._answer = answer

    def render_GET(self, request: Request) -> bytes:
        code, content_type, body = self._answer()
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-store")
        return body


def health_site(metrics: Metrics, ready: Callable[[], tuple[bool, str]]) -> Site:
    """The probe and metrics endpoints.

    /healthz answers 200 whenever the reactor can answer at all (liveness);
    /readyz answers 200 only while connected and consuming, else 503 with the
    state; /metrics is Prometheus's text format.
    """

    def readyz() -> tuple[int, bytes, bytes]:
        ok, state = ready()
        return (200 if ok else 503), b"text/plain; charset=utf-8", f"{state}\n".encode()

    root = Resource()
    root.putChild(b"healthz", _Text(lambda: (200, b"text/plain; charset=utf-8", b"ok\n")))
    root.putChild(b"readyz", _Text(readyz))
    root.putChild(b"metrics", _Text(lambda: (200, CONTENT_TYPE_LATEST.encode(), metrics.render())))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log per probe
    return site
