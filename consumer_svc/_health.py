"""Health probes and Prometheus metrics over HTTP: /healthz, /readyz, /metrics.

Metrics live in a registry of the service's own (not prometheus-client's
global one), so that several services in one process never collide.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ._consumer import Outcome

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
