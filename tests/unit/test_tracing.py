"""Tracing: a CONSUMER span per delivery, its context current in every kind of handler, and
PRODUCER spans whose context travels on in what the handler and the service publish.

Spans are recorded with the SDK's InMemorySpanExporter (support.spans), through the testing
kit, no broker; tests/broker/test_tracing.py follows the same trace through a real broker.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from support.spans import PARENT_ID, TRACE_ID, TRACEPARENT, Spans, traceparent_ids
from twisted.internet.defer import Deferred

import consumer_svc
from consumer_svc import Message
from consumer_svc.testing import Outcome, Result, Runner, message

# -- without a broker: the testing kit


def _settled(outcome: Result | Deferred[Result]) -> Result:
    if isinstance(outcome, Result):
        return outcome
    results: list[Result] = []
    outcome.addCallback(results.append)
    assert results, "not settled"
    return results[0]


def test_a_delivery_is_processed_in_a_consumer_span_child_of_its_traceparent(spans: Spans) -> None:
    """The span follows the RabbitMQ messaging conventions and continues the producer's trace."""
    from pika.spec import BasicProperties

    runner = Runner(lambda m: None, queue="tasks", tracer_provider=spans.provider)
    incoming = message(
        b"job",
        headers={"traceparent": TRACEPARENT},
        properties=BasicProperties(message_id="m-7", correlation_id="c-1"),
        routing_key="tasks.new",
        exchange="jobs",
        delivery_tag=3,
    )
    assert _settled(runner.run(incoming)).outcome is Outcome.ACKED
    [span] = spans.finished()
    assert span.name == "process tasks"
    assert span.kind is SpanKind.CONSUMER
    assert span.parent is not None
    assert (span.context.trace_id, span.parent.span_id) == (TRACE_ID, PARENT_ID)
    assert span.parent.is_remote
    assert dict(span.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "jobs:tasks.new:tasks",
        "messaging.rabbitmq.destination.routing_key": "tasks.new",
        "messaging.rabbitmq.message.delivery_tag": 3,
        "messaging.message.id": "m-7",
        "messaging.message.conversation_id": "c-1",
        "messaging.message.body.size": 3,
        "consumer_svc.outcome": "acked",
    }
    assert span.status.status_code is StatusCode.UNSET


def test_a_message_without_traceparent_starts_a_trace() -> None:
    """No traceparent: the span is a root span."""
    spans = Spans()
    _settled(Runner(lambda m: None, tracer_provider=spans.provider).run(message()))
    [span] = spans.finished()
    assert span.parent is None


def test_a_failure_is_on_the_span_and_the_retry_copy_carries_the_trace_on(spans: Spans) -> None:
    """error.type and the outcome mark the span; the copy is sent in a child PRODUCER span."""

    def handler(m: Message) -> None:
        raise RuntimeError("database down")

    runner = Runner(handler, queue="tasks", tracer_provider=spans.provider)
    result = _settled(runner.run(message(headers={"traceparent": TRACEPARENT})))
    [process] = spans.named("process tasks")
    [copy] = spans.named("send tasks.retry.5s")
    assert process.attributes is not None
    assert process.attributes["error.type"] == "RuntimeError"
    assert process.attributes["consumer_svc.outcome"] == "retried"
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == "RuntimeError: database down"
    assert copy.kind is SpanKind.PRODUCER
    assert copy.parent is not None
    assert copy.parent.span_id == process.context.span_id
    assert result.copy is not None
    assert traceparent_ids(result.copy.headers) == (TRACE_ID, copy.context.span_id)


def test_a_timed_out_handler_is_marked_as_a_timeout(spans: Spans) -> None:
    """A handler cancelled at --handler-timeout has error.type "timeout"."""
    runner = Runner(lambda m: Deferred(), handler_timeout=5, tracer_provider=spans.provider)
    d = runner.run(message())
    runner.clock.advance(5)
    _settled(d)
    [process] = spans.named("process queue")
    assert process.attributes is not None
    assert process.attributes["error.type"] == "timeout"


def test_a_publish_that_fails_ends_its_span_with_the_error(spans: Spans) -> None:
    """A nacked publish's PRODUCER span says so."""
    from consumer_svc.testing import Confirm

    runner = Runner(
        lambda m: m.publish("out", "key", b"x") and None,
        confirm=lambda p: Confirm.ACK if p.copy else Confirm.NACK,
        tracer_provider=spans.provider,
    )
    _settled(runner.run(message()))
    [send_span] = spans.named("send out:key")
    assert send_span.attributes is not None
    assert send_span.attributes["error.type"] == "consumer_svc._errors.PublishFailed"
    assert send_span.status.status_code is StatusCode.ERROR


def test_a_reply_to_a_temporary_queue_is_named_without_the_queue(spans: Spans) -> None:
    """A reply to amq.gen-... is "send (temporary)": its name would be a new span name each time."""
    from pika.spec import BasicProperties

    runner = Runner(lambda m: m.reply(b"pong") and None, tracer_provider=spans.provider)
    _settled(runner.run(message(properties=BasicProperties(reply_to="amq.gen-Xy1"))))
    [reply] = spans.named("send (temporary)")
    assert reply.attributes is not None
    assert reply.attributes["messaging.destination.temporary"] is True


@pytest.mark.parametrize("style", ["plain", "coroutine", "blocking"])
def test_the_span_is_current_in_the_handler_and_its_publish_is_a_child(
    spans: Spans, style: str
) -> None:
    """Inside the handler the process span is current; the forward carries a child span's context."""
    seen: list[int] = []
    gate: Deferred[None] = Deferred()

    async def coroutine(m: Message) -> None:
        await gate
        seen.append(trace.get_current_span().get_span_context().span_id)
        await m.publish("", "out", m.body)

    @consumer_svc.blocking
    def blocking(m: Message) -> None:
        seen.append(trace.get_current_span().get_span_context().span_id)

    def plain(m: Message) -> None:
        seen.append(trace.get_current_span().get_span_context().span_id)
        m.publish("", "out", m.body)

    handler = {"plain": plain, "coroutine": coroutine, "blocking": blocking}[style]
    runner = Runner(handler, tracer_provider=spans.provider)
    outcome = runner.run(message(headers={"traceparent": TRACEPARENT}))
    gate.callback(None)
    result = _settled(outcome)
    [process] = spans.named("process queue")
    assert seen == [process.context.span_id]
    assert trace.get_current_span().get_span_context().is_valid is False  # nothing leaked out
    if style != "blocking":
        [forward] = result.publishes
        [send_span] = spans.named("send out")
        assert send_span.parent is not None
        assert send_span.parent.span_id == process.context.span_id
        assert traceparent_ids(forward.headers) == (TRACE_ID, send_span.context.span_id)


def test_in_a_deferred_callback_the_span_is_current_only_when_kept(spans: Spans) -> None:
    """A callback fired later runs in the firer's context, unless wrapped in keep_context; publishes parent on the span either way."""
    seen: dict[str, int] = {}
    later: Deferred[None] = Deferred()

    def handler(m: Message) -> Deferred[None]:
        def kept(_: object) -> None:
            seen["kept"] = trace.get_current_span().get_span_context().span_id

        def bare(_: object) -> Deferred[None]:
            seen["bare"] = trace.get_current_span().get_span_context().span_id
            return m.publish("", "out", b"x")

        later.addCallback(consumer_svc.keep_context(kept))
        later.addCallback(bare)
        return later

    outcome = Runner(handler, tracer_provider=spans.provider).run(message())
    later.callback(None)  # fired from the test, outside the handler's context
    _settled(outcome)
    [process] = spans.named("process queue")
    [send_span] = spans.named("send out")
    assert seen == {"kept": process.context.span_id, "bare": 0}
    assert send_span.parent is not None
    assert send_span.parent.span_id == process.context.span_id


def test_without_a_tracer_nothing_is_added_to_what_is_published() -> None:
    """Tracing off: a forward carries no traceparent, and the retry copy keeps the original's."""

    def handler(m: Message) -> None:
        m.publish("", "out", b"x")
        raise RuntimeError("then fail")

    result = _settled(Runner(handler).run(message(headers={"traceparent": TRACEPARENT})))
    [forward] = result.publishes
    assert "traceparent" not in forward.headers
    assert result.copy is not None
    assert result.copy.headers["traceparent"] == TRACEPARENT


# -- configuration from the standard environment


def _configure(**environ: str) -> str:
    code = (
        "from consumer_svc._tracing import configure\n"
        "t = configure()\n"
        "print('on' if t is not None else 'off')\n"
        "if t is not None:\n"
        "    from opentelemetry import trace\n"
        "    trace.get_tracer('x').start_span('probe').end()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(environ)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_tracing_is_off_without_a_provider_or_an_exporter() -> None:
    """No OTEL_TRACES_EXPORTER and no provider set: no tracing at all."""
    assert _configure().strip() == "off"
    assert _configure(OTEL_TRACES_EXPORTER="none").strip() == "off"


def test_the_sdk_autoconfigures_from_the_standard_environment() -> None:
    """OTEL_TRACES_EXPORTER=console and OTEL_SERVICE_NAME set up the SDK: spans print with the service name."""
    out = _configure(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="billing-worker")
    assert out.startswith("on")
    assert '"name": "probe"' in out
    assert '"service.name": "billing-worker"' in out


def test_an_exporter_that_is_not_installed_leaves_tracing_off_not_the_service() -> None:
    """OTEL_TRACES_EXPORTER naming an exporter that is not installed turns tracing off, and nothing raises."""
    assert _configure(OTEL_TRACES_EXPORTER="nonesuch").strip() == "off"


def test_otel_sdk_disabled_turns_tracing_off() -> None:
    """OTEL_SDK_DISABLED=true wins over an exporter."""
    assert _configure(OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="true").strip() == "off"
