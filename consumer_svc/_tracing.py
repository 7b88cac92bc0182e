"""Tracing with OpenTelemetry (the ``[otel]`` extra): a span for each delivery and each publish.

Each delivery is processed in a CONSUMER span, ``process <queue>``, a child of the context
its W3C ``traceparent``/``tracestate`` headers carry, following the messaging semantic
conventions for RabbitMQ. That span's context is current while the handler runs, whatever
its kind (see `Trace.run`); every publish of the handler's and every retry or dead-letter
copy is a PRODUCER span, ``send <destination>``, whose context travels on in the published
message's headers.

Only this module imports ``opentelemetry``; the consumer holds a `Tracing` only when tracing
is on (`configure`), so with tracing off the per-message path pays one ``is None`` test.
"""

from __future__ import annotations

import contextvars
import copy
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from pika.spec import BasicProperties
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from ._message import Message

__all__ = ["Trace", "Tracing", "configure"]

log = Logger(namespace="consumer_svc.tracing")
T = TypeVar("T")

#: Our own attribute: how the message left the service (the metrics' outcome labels).
OUTCOME = "consumer_svc.outcome"

#: The delivery whose handler runs in the current context (see `Trace.run`).
_delivery: contextvars.ContextVar[Trace | None] = contextvars.ContextVar(
    "consumer_svc_delivery", default=None
)


class _HeadersGetter(Getter[Mapping[Any, Any]]):
    """Reads W3C trace context from AMQP headers, whose strings may arrive as bytes."""

    def get(self, carrier: Mapping[Any, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return [str(value)]

    def keys(self, carrier: Mapping[Any, Any]) -> list[str]:
        return [str(key) for key in carrier]


_GETTER = _HeadersGetter()


def _error_type(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _destination(exchange: str, routing_key: str, queue: str | None = None) -> str:
    """``messaging.destination.name`` as the RabbitMQ conventions compose it.

    ``{exchange}:{routing key}`` (and ``:{queue}`` for a consumer), leaving out the empty
    parts and a queue equal to the routing key; ``amq.default`` when nothing is left.
    """
    parts = [exchange, routing_key]
    if queue is not None and queue != routing_key:
        parts.append(queue)
    return ":".join(part for part in parts if part) or "amq.default"


class Tracing:
    """Starts the spans of deliveries, from one OpenTelemetry tracer."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    def delivered(self, queue: str, message: Message) -> Trace:
        """Start the CONSUMER span of one delivery from ``queue``."""
        parent = propagate.extract(message.headers, getter=_GETTER)
        attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": _destination(
                message.exchange, message.routing_key, queue
            ),
            "messaging.rabbitmq.message.delivery_tag": message.delivery_tag,
            "messaging.message.body.size": len(message.body),
        }
        if message.routing_key:
            attributes["messaging.rabbitmq.destination.routing_key"] = message.routing_key
        properties = message.properties
        if properties.message_id:
            attributes["messaging.message.id"] = str(properties.message_id)
        if properties.correlation_id:
            attributes["messaging.message.conversation_id"] = str(properties.correlation_id)
        span = self.tracer.start_span(
            f"process {queue}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        return Trace(self.tracer, span, trace.set_span_in_context(span, parent))


class Trace:
    """One delivery's CONSUMER span, from its arrival until the message is settled."""

    __slots__ = ("context", "span", "tracer")

    def __init__(self, tracer: trace.Tracer, span: Span, context: otel_context.Context) -> None:
        self.tracer = tracer
        self.span = span
        self.context = context

    def run(self, call: Callable[..., T], *args: Any) -> T:
        """Call the handler (through the invoker) with this span's context current.

        It runs in a copy of the current ``contextvars`` context, so nothing leaks into
        the reactor's: coroutines and ``@inlineCallbacks`` generators started inside keep
        that copy for every step (Twisted runs them in the context they began in), and
        the invoker hands a copy to a ``@blocking`` handler's thread. Plain Deferred
        callbacks that the reactor fires later run in the reactor's context (twisted#9807):
        wrap them in `consumer_svc.keep_context`; ``message.publish`` parents on this span either way.
        """
        return contextvars.copy_context().run(self._run, call, args)

    def _run(self, call: Callable[..., T], args: tuple[Any, ...]) -> T:
        otel_context.attach(self.context)  # into the throwaway copy: no detach needed
        _delivery.set(self)
        return call(*args)

    def failed(self, error: BaseException | str, reason: str) -> None:
        """The handler failed (or the message could not be handled): say why on the span."""
        self.span.set_attribute("error.type", _error_type(error))
        self.span.set_status(Status(StatusCode.ERROR, reason))

    def settled(self, outcome: str) -> None:
        """The message left the service: end the span with its outcome."""
        self.span.set_attribute(OUTCOME, outcome)
        self.span.end()

    def publish(
        self,
        send: Callable[[str, str, bytes, BasicProperties | None, bool], Deferred[None]],
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties | None,
        mandatory: bool,
    ) -> Deferred[None]:
        """Publish through ``send`` in a PRODUCER span whose context the message carries."""
        # Inside the handler a span of its own may be current (a child of ours); elsewhere
        # (a Deferred callback, a retry copy) the current context is not this delivery's.
        parent = otel_context.get_current() if _delivery.get() is self else self.context
        temporary = not exchange and routing_key.startswith("amq.gen-")
        destination = _destination(exchange, routing_key)
        attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": destination,
            "messaging.message.body.size": len(body),
        }
        if routing_key:
            attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
        if temporary:
            attributes["messaging.destination.temporary"] = True
        if properties is not None and properties.message_id:
            attributes["messaging.message.id"] = str(properties.message_id)
        name = "send (temporary)" if temporary else f"send {destination}"
        span = self.tracer.start_span(
            name, context=parent, kind=SpanKind.PRODUCER, attributes=attributes
        )
        # A copy: the caller's properties are theirs, and may be reused.
        carried = copy.copy(properties) if properties is not None else BasicProperties()
        headers = dict(carried.headers or {})
        propagate.inject(headers, context=trace.set_span_in_context(span, parent))
        carried.headers = headers
        try:
            d = send(exchange, routing_key, body, carried, mandatory)
        except BaseException as e:
            _end(span, e)
            raise

        def end(result: object) -> object:
            _end(span, result.value if isinstance(result, Failure) else None)
            return result

        return d.addBoth(end)


def _end(span: Span, error: BaseException | None) -> None:
    if error is not None:
        span.set_attribute("error.type", _error_type(error))
        span.set_status(Status(StatusCode.ERROR, str(error)))
    span.end()


def configure(environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """A `Tracing` on the global tracer provider, or None when tracing is off.

    A provider set before us (``opentelemetry-instrument``, or the handler's module) is
    used as it is. Otherwise, when the standard environment asks for traces
    (``OTEL_TRACES_EXPORTER`` other than ``none``), the SDK's own autoconfiguration sets one
    up from ``OTEL_*``; with no provider at all, tracing is off and costs nothing.
    """
    from . import __version__

    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):
        exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        if not exporters or exporters == "none":
            return None
        try:
            from opentelemetry.sdk._configuration import _OTelSDKConfigurator
        except ImportError:
            log.warn(
                "OTEL_TRACES_EXPORTER={exporters} asks for traces, but opentelemetry-sdk is "
                "not installed: tracing is off",
                exporters=exporters,
            )
            return None
        try:
            _OTelSDKConfigurator().configure()
        except Exception as e:  # e.g. an exporter asked for but not installed
            # Telemetry must never keep messages from being handled.
            log.warn(
                "Tracing is off: OpenTelemetry's SDK could not configure it from the "
                "environment: {error}",
                error=f"{type(e).__name__}: {e}",
            )
            return None
        provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return Tracing(provider.get_tracer("consumer_svc", __version__))
