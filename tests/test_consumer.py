"""Settling messages: the rules of ack, reject and requeue, with a fake channel and a Clock.

The same behaviours are checked against a real broker in test_service.py.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from pika.exceptions import ChannelClosedByBroker
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from consumer_svc import Message, Reject
from consumer_svc._consumer import Consumer, ConsumerState
from consumer_svc._settings import Settings, parse_url


class FakeChannel:
    """Stands in for consumer_svc._amqp.Channel and records what the consumer settles."""

    def __init__(self) -> None:
        self.is_open = True
        self.closed: Deferred[BaseException] = Deferred()
        self.on_cancelled: Callable[[], None] | None = None
        self.settled: list[tuple[str, int]] = []
        self.on_message: Any = None
        self.cancelled = False

    def declare_queue(self, queue: str, *, passive: bool, arguments: Any) -> Deferred[Any]:
        return succeed(None)

    def qos(self, prefetch: int) -> Deferred[Any]:
        return succeed(None)

    def consume(self, queue: str, on_message: Any) -> Deferred[str]:
        self.on_message = on_message
        return succeed("ctag")

    def cancel(self, tag: str) -> Deferred[Any]:
        self.cancelled = True
        return succeed(None)

    def ack(self, tag: int, multiple: bool = False) -> None:
        self.settled.append(("ack", tag))

    def nack(self, tag: int, requeue: bool = True) -> None:
        self.settled.append(("requeue" if requeue else "drop", tag))

    def reject(self, tag: int, requeue: bool = False) -> None:
        self.settled.append(("reject", tag))

    def deliver(self, tag: int, body: bytes = b"x") -> None:
        method = type(
            "Deliver",
            (),
            {"delivery_tag": tag, "routing_key": "q", "exchange": "", "redelivered": False},
        )
        self.on_message(self, method, type("Props", (), {"headers": None})(), body)

    def die(self) -> None:
        self.is_open = False
        self.closed.callback(
            ChannelClosedByBroker(406, "PRECONDITION_FAILED - unknown delivery tag 1")
        )


class FakeConnection:
    def __init__(self, channel: FakeChannel) -> None:
        self.channel = channel

    def open_channel(self) -> Deferred[FakeChannel]:
        return succeed(self.channel)


class Invoke:
    """A handler whose results the test decides, message by message."""

    name = "tests.handler"
    blocking = False

    def __init__(self, behaviour: Callable[[Message], Any]) -> None:
        self.behaviour = behaviour
        self.seen: list[int] = []

    def __call__(self, message: Message) -> Any:
        self.seen.append(message.delivery_tag)
        return self.behaviour(message)


SETTINGS = Settings(url=parse_url("amqp://localhost"), queue="q", requeue_delay=1.0)


def consuming(
    behaviour: Callable[[Message], Any],
) -> tuple[Consumer, FakeChannel, Clock, list[str]]:
    clock, channel, lost = Clock(), FakeChannel(), []
    consumer = Consumer(SETTINGS, Invoke(behaviour), clock, lost.append)  # type: ignore[arg-type]
    consumer.attach(FakeConnection(channel))  # type: ignore[arg-type]
    assert consumer.state is ConsumerState.CONSUMING
    return consumer, channel, clock, lost


def test_a_plain_result_is_acked_at_once() -> None:
    """A handler that returns a value has its message acked immediately."""
    _, channel, _, _ = consuming(lambda m: None)
    channel.deliver(1)
    assert channel.settled == [("ack", 1)]


def test_a_deferred_result_is_acked_only_when_it_succeeds() -> None:
    """Nothing is acked while the handler's Deferred is pending."""
    pending: Deferred[None] = Deferred()
    consumer, channel, _, _ = consuming(lambda m: pending)
    channel.deliver(1)
    assert channel.settled == []
    assert len(consumer.inflight) == 1
    pending.callback(None)
    assert channel.settled == [("ack", 1)]
    assert not consumer.inflight


def test_a_coroutine_is_awaited_before_the_ack() -> None:
    """An async handler's message is acked once the coroutine returns."""
    gate: Deferred[None] = Deferred()

    async def handler(message: Message) -> None:
        await gate

    _consumer, channel, _, _ = consuming(lambda m: Deferred.fromCoroutine(handler(m)))
    channel.deliver(5)
    assert channel.settled == []
    gate.callback(None)
    assert channel.settled == [("ack", 5)]


def test_a_failure_is_requeued_after_a_pause() -> None:
    """A failing handler's message goes back to the queue after the requeue delay, not at once."""

    def fail(message: Message) -> None:
        raise RuntimeError("database down")

    _, channel, clock, _ = consuming(fail)
    channel.deliver(1)
    assert channel.settled == []
    clock.advance(0.99)
    assert channel.settled == []
    clock.advance(0.01)
    assert channel.settled == [("requeue", 1)]


def test_reject_is_a_reject_without_requeue() -> None:
    """Raising Reject rejects the message for good (the broker drops or dead-letters it)."""

    def refuse(message: Message) -> None:
        raise Reject("malformed")

    _, channel, _, _ = consuming(refuse)
    channel.deliver(1)
    assert channel.settled == [("reject", 1)]


def test_a_failed_deferred_counts_as_a_failure() -> None:
    """An errback is a failure like a raised exception."""
    pending: Deferred[None] = Deferred()
    _, channel, clock, _ = consuming(lambda m: pending)
    channel.deliver(1)
    pending.errback(ValueError("nope"))
    clock.advance(1.0)
    assert channel.settled == [("requeue", 1)]


def test_no_ack_goes_to_a_channel_other_than_the_delivery_s() -> None:
    """A delivery from a channel that died is never acked, even on the new channel."""
    pending: Deferred[None] = Deferred()
    consumer, old, _clock, lost = consuming(lambda m: pending)
    old.deliver(1)
    old.die()
    assert lost == [
        "channel closed by the broker: 406 PRECONDITION_FAILED - unknown delivery tag 1"
    ]
    new = FakeChannel()
    consumer.attach(FakeConnection(new))  # type: ignore[arg-type]
    pending.callback(None)
    assert old.settled == []
    assert new.settled == []
    assert not consumer.inflight


def test_draining_waits_for_in_flight_messages_and_acks_them() -> None:
    """On stop the consumer is cancelled, and a handler that finishes in time is acked."""
    pending: Deferred[None] = Deferred()
    consumer, channel, clock, _ = consuming(lambda m: pending)
    channel.deliver(1)
    drained = consumer.drain(timeout=30)
    assert channel.cancelled
    assert not drained.called
    clock.advance(10)
    pending.callback(None)
    assert drained.called
    assert channel.settled == [("ack", 1)]
    assert consumer.state is ConsumerState.STOPPED
    assert clock.getDelayedCalls() == []


def test_the_deadline_hands_back_what_is_still_running() -> None:
    """At the deadline a still-running handler is cancelled and its message requeued; a late success is ignored."""
    pending: Deferred[None] = Deferred()
    consumer, channel, clock, _ = consuming(lambda m: pending)
    channel.deliver(1)
    drained = consumer.drain(timeout=30)
    clock.advance(30)
    assert drained.called
    assert channel.settled == [("requeue", 1)]
    assert pending.called  # cancelled
    assert consumer.abandoned == 1


def test_a_late_result_after_the_deadline_is_not_acked() -> None:
    """A handler that finishes after its message was handed back neither acks nor errors."""
    late: Deferred[None] = Deferred()
    consumer, channel, clock, _ = consuming(lambda m: late)
    channel.deliver(1)
    consumer.drain(timeout=5)
    clock.advance(5)
    late.callback(None)  # the handler's own code fires it anyway
    assert channel.settled == [("requeue", 1)]


def test_messages_arriving_while_draining_are_handed_back_at_once() -> None:
    """A delivery that crossed our cancel in flight is requeued without calling the handler."""
    invoke_calls: list[int] = []
    consumer, channel, _, _ = consuming(lambda m: invoke_calls.append(m.delivery_tag))
    consumer.drain(timeout=30)
    channel.deliver(9)
    assert channel.settled == [("requeue", 9)]
    assert invoke_calls == []


def test_draining_flushes_held_failures_at_once() -> None:
    """A failed message waiting out its requeue delay is handed back as soon as the stop begins."""

    def fail(message: Message) -> None:
        raise RuntimeError("boom")

    consumer, channel, clock, _ = consuming(fail)
    channel.deliver(1)
    drained = consumer.drain(timeout=30)
    assert drained.called
    assert channel.settled == [("requeue", 1)]
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("state_after", [ConsumerState.IDLE])
def test_a_broker_cancel_is_reported(state_after: ConsumerState) -> None:
    """When the broker cancels the consumer (queue deleted), the owner is told to recover."""
    consumer, channel, _, lost = consuming(lambda m: None)
    assert channel.on_cancelled is not None
    channel.on_cancelled()
    assert consumer.state is state_after
    assert lost == ["the broker cancelled the consumer of queue 'q'"]


def test_a_handler_past_its_timeout_is_cancelled_and_requeued() -> None:
    """--handler-timeout cancels a pending handler, counts it as failed and requeues its message."""
    pending: Deferred[None] = Deferred()
    consumer, channel, clock, _ = consuming(lambda m: pending)
    channel.deliver(1)
    clock.advance(SETTINGS.handler_timeout - 0.1)
    assert not pending.called
    clock.advance(0.1)
    assert pending.called  # cancelled
    assert channel.settled == []
    clock.advance(SETTINGS.requeue_delay)
    assert channel.settled == [("requeue", 1)]
    assert not consumer.inflight
    assert clock.getDelayedCalls() == []


def test_a_handler_holding_the_reactor_is_named_in_a_warning() -> None:
    """A synchronous call that holds the reactor for over a second is logged with the handler's name."""
    from twisted.logger import LogEvent, globalLogPublisher

    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        now = [0.0]

        def hog(message: Message) -> None:
            now[0] += 7.0  # seven seconds of the reactor's time

        consumer, channel, _, _ = consuming(hog)
        consumer.monotonic = lambda: now[0]
        channel.deliver(1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [stall] = [e for e in events if "stall_seconds" in e]
    assert stall["handler"] == "tests.handler"
    assert stall["stall_seconds"] == 7.0
    assert channel.settled == [("ack", 1)]
