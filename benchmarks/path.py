"""``python -m benchmarks.path``: consumer_svc's own per-message cost, without pika or a broker.

Drives the real `Consumer` (dispatch, settling, coalesced acks) and the real
`Metrics` with a channel that only counts what it is told, so the figure is
what consumer_svc adds on top of pika's frame decoding for each message of a
synchronous no-op handler. ``--profile`` prints where that time goes; ``--tracing`` adds
a run with tracing on (OpenTelemetry's SDK, each span handed to an exporter that drops it:
the cost of the spans themselves, not of shipping them).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable
from typing import Any

from pika.spec import BasicProperties
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from consumer_svc._consumer import Consumer
from consumer_svc._health import Metrics
from consumer_svc._settings import Settings
from consumer_svc._url import parse_url
from consumer_svc.testing._fakes import connect


class CountingChannel:
    """Just enough of consumer_svc._channel.Channel; reads end every ``per_read`` deliveries."""

    is_open = True

    def __init__(self) -> None:
        self.closed: Deferred[BaseException] = Deferred()
        self.on_cancelled: Callable[[], None] | None = None
        self.on_message: Any = None
        self.acks = 0
        self._after_read: list[Callable[[], None]] = []

    def declare_queue(self, queue: str, *, passive: bool = False, arguments: Any) -> Deferred[Any]:
        return succeed(None)

    def qos(self, prefetch: int) -> Deferred[Any]:
        return succeed(None)

    def confirm(self) -> Deferred[Any]:
        return succeed(None)

    def consume(self, queue: str, on_message: Any) -> Deferred[str]:
        self.on_message = on_message
        return succeed("ctag")

    def soon(self, call: Callable[[], None]) -> None:
        self._after_read.append(call)

    def end_of_read(self) -> None:
        after, self._after_read = self._after_read, []
        for call in after:
            call()

    def ack(self, tag: int, multiple: bool = False) -> None:
        self.acks += 1


class Connection:
    """The publisher's channel, the consumer's, then one for each retry/dead-letter declare."""

    def __init__(self) -> None:
        self.channels = [CountingChannel(), CountingChannel()]

    def open_channel(self) -> Deferred[CountingChannel]:
        return succeed(self.channels.pop(0) if self.channels else CountingChannel())


class Deliver:
    routing_key = "q"
    exchange = ""
    redelivered = False
    delivery_tag = 0


class NoOp:
    name = "noop"
    blocking = False

    def __call__(self, message: Any) -> None:
        return None


def _tracing() -> Any:
    """Tracing on an SDK tracer provider whose exporter drops every span."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from consumer_svc._tracing import Tracing

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    return Tracing(provider.get_tracer("benchmarks.path"))


def run(count: int, per_read: int, metrics: bool, tracing: bool = False) -> tuple[float, int]:
    settings = Settings(url=parse_url("amqp://localhost"), queue="q", max_retries=0)
    consumer = Consumer(settings, NoOp(), Clock())  # type: ignore[arg-type]
    if tracing:
        consumer.tracing = _tracing()
    if metrics:  # wired as ConsumerService wires them
        m = Metrics(inflight=lambda: len(consumer.inflight))
        consumer.on_outcome = m.settled
        consumer.on_handled = m.handled
    connection = Connection()
    channel = connection.channels[1]
    connect(consumer.machine, connection)  # type: ignore[arg-type]
    on_message, method, properties = channel.on_message, Deliver(), BasicProperties()
    started = time.perf_counter()
    for tag in range(1, count + 1):
        method.delivery_tag = tag
        on_message(channel, method, properties, b"x" * 100)
        if tag % per_read == 0:
            channel.end_of_read()
    channel.end_of_read()
    return time.perf_counter() - started, channel.acks


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.path")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--per-read", type=int, default=38, help="deliveries per socket read")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tracing", action="store_true", help="also run with tracing on")
    args = parser.parse_args()
    runs = [(False, False, "without metrics"), (True, False, "with metrics")]
    if args.tracing:
        runs.append((True, True, "with metrics and tracing"))
    for metrics, tracing, label in runs:
        best = min(run(args.count, args.per_read, metrics, tracing)[0] for _ in range(3))
        print(f"consumer_svc's own path, {label}: {best / args.count * 1e6:.2f} us per message")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(run, args.count, args.per_read, True)
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
