"""Tracing through a real broker: the producer's trace goes on through every kind of handler,
a retry copy and `twistd consumer`, each span recorded with the SDK's InMemorySpanExporter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from opentelemetry import trace
from support import amqp_tools
from support.service_support import Running, send, settings_for
from support.spans import PARENT_ID, TRACE_ID, TRACEPARENT, Spans, traceparent_ids
from support.waiting import eventually
from twisted.internet import task
from twisted.internet.defer import Deferred

import consumer_svc
from consumer_svc import Message
from consumer_svc.testing.rabbitmq import RabbitNode

STYLES = ["plain", "deferred", "coroutine", "blocking"]


def _handler(style: str, seen: list[int], forward_to: str) -> Callable[[Message], Any]:
    """A handler of ``style`` that notes the current span's id, then forwards the message."""

    def note_and_forward(m: Message) -> Deferred[None]:
        seen.append(trace.get_current_span().get_span_context().span_id)
        return m.publish("", forward_to, m.body)

    if style == "plain":

        def plain(m: Message) -> None:
            note_and_forward(m)

        return plain
    if style == "deferred":
        from twisted.internet import reactor

        def deferred(m: Message) -> Deferred[Any]:
            seen.append(trace.get_current_span().get_span_context().span_id)
            # A callback the reactor fires later: keep_context makes the span current in it.
            return task.deferLater(reactor, 0.01, consumer_svc.keep_context(note_and_forward), m)

        return deferred
    if style == "coroutine":
        from twisted.internet import reactor

        async def coroutine(m: Message) -> None:
            await task.deferLater(reactor, 0.01, lambda: None)
            await note_and_forward(m)

        return coroutine

    @consumer_svc.blocking
    def blocking(m: Message) -> None:
        seen.append(trace.get_current_span().get_span_context().span_id)
        # Publishing from the thread is the reactor's job: a blocking handler returns first.

    return blocking


def _traced_service(spans: Spans, url: str, queue: str, handler: Any, **overrides: Any) -> Running:
    from consumer_svc._tracing import Tracing

    run = Running(settings_for(url, queue, **overrides), handler)
    # startService found no tracer provider; hand it the test's own before anything arrives.
    run.service.consumer.tracing = Tracing(spans.provider.get_tracer("tests"))
    return run


@pytest.mark.parametrize("style", STYLES)
@pytest_twisted.ensureDeferred
async def test_each_handler_style_continues_the_trace_through_a_broker(
    spans: Spans, rabbit: RabbitNode, queue_name: str, style: str
) -> None:
    """Through a real broker: the process span is the producer's child and current in the handler; the forward carries it on."""
    out = f"{queue_name}.out"
    amqp_tools.declare(rabbit.url(), out)
    seen: list[int] = []
    run = _traced_service(spans, rabbit.url(), queue_name, _handler(style, seen, out))
    try:
        await run.consuming()
        await send(rabbit, queue_name, [b"job"], headers={"traceparent": TRACEPARENT})
        await eventually(
            lambda: spans.named(f"process {queue_name}"), timeout=20, what="the process span"
        )
    finally:
        await run.stop()
    [process] = spans.named(f"process {queue_name}")
    assert process.parent is not None
    assert (process.context.trace_id, process.parent.span_id) == (TRACE_ID, PARENT_ID)
    assert process.attributes is not None
    assert process.attributes["consumer_svc.outcome"] == "acked"
    assert process.attributes["messaging.destination.name"] == queue_name
    assert seen[0] == process.context.span_id
    if style == "blocking":
        assert seen == [process.context.span_id]
        return
    assert seen == [process.context.span_id] * len(seen)
    [send_span] = spans.named(f"send {out}")
    assert send_span.parent is not None
    assert send_span.parent.span_id == process.context.span_id
    [forwarded] = amqp_tools.get_messages(rabbit.url(), out)
    assert traceparent_ids(forwarded.headers) == (TRACE_ID, send_span.context.span_id)


@pytest_twisted.ensureDeferred
async def test_a_retried_message_comes_back_as_a_child_of_its_retry_copy(
    spans: Spans, rabbit: RabbitNode, queue_name: str
) -> None:
    """The retry copy's PRODUCER span is the parent of the next attempt's process span, one trace throughout."""
    attempts: list[int] = []

    def handler(m: Message) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first time")

    run = _traced_service(spans, rabbit.url(), queue_name, handler, retry_delay=1.0)
    try:
        await run.consuming()
        await send(rabbit, queue_name, [b"job"], headers={"traceparent": TRACEPARENT})
        await eventually(
            lambda: len(spans.named(f"process {queue_name}")) == 2,
            timeout=30,
            what="two process spans",
        )
    finally:
        await run.stop()
    first, second = sorted(spans.named(f"process {queue_name}"), key=lambda s: s.start_time or 0)
    [copy] = spans.named(f"send {queue_name}.retry.1s")
    assert first.attributes is not None
    assert first.attributes["consumer_svc.outcome"] == "retried"
    assert copy.parent is not None
    assert copy.parent.span_id == first.context.span_id
    assert second.parent is not None
    assert second.parent.span_id == copy.context.span_id
    assert {first.context.trace_id, copy.context.trace_id, second.context.trace_id} == {TRACE_ID}


def test_twistd_traces_by_the_standard_environment(
    twistd: Callable[..., Any], rabbit: RabbitNode, queue_name: str
) -> None:
    """twistd consumer with OTEL_TRACES_EXPORTER=console prints each message's process span, in the producer's trace."""
    run = twistd(
        ["--url", rabbit.url(), "--queue", queue_name],
        env={
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_SERVICE_NAME": "kit-test",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    run.wait_for_log("Tracing: a span for each message", timeout=30)
    run.wait_for_log("Consuming", timeout=30)
    amqp_tools.publish(rabbit.url(), queue_name, [b"job"], headers={"traceparent": TRACEPARENT})
    run.wait_for_log(f'"name": "process {queue_name}"', timeout=30)
    text = run.text()
    assert f'"trace_id": "0x{TRACE_ID:032x}"' in text
    assert f'"parent_id": "0x{PARENT_ID:016x}"' in text
    assert '"service.name": "kit-test"' in text
