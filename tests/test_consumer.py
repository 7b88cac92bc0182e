"""Settling messages: the rules of ack, reject and requeue, with a fake channel and a Clock.

The fakes are the testing kit's own (consumer_svc.testing); the same behaviours are checked
against a real broker in test_service.py.
"""

from __future__ import annotations

from typing import Any, Callable

from pika.exceptions import ChannelClosedByBroker, NackError, UnroutableError
from pika.spec import BasicProperties
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from consumer_svc import Message, Reject, Retry
from consumer_svc._consumer import Consumer, ConsumerState
from consumer_svc._settings import Settings, parse_url
from consumer_svc.testing import FakeChannel, FakeConnection


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


SETTINGS = Settings(
    url=parse_url("amqp://localhost"),
    queue="q",
    dead_letter_queue="q.dead",
    max_retries=2,
    retry_delay=5.0,
)


class Setup:
    """A consumer attached to fake channels, with a Clock."""

    def __init__(
        self, behaviour: Callable[[Message], Any], refuse_declares: Exception | None = None
    ) -> None:
        self.clock = Clock()
        self.publisher = FakeChannel(self.clock)
        self.channel = FakeChannel(self.clock)
        self.lost: list[str] = []
        self.consumer = Consumer(SETTINGS, Invoke(behaviour), self.clock, self.lost.append)  # type: ignore[arg-type]
        self.connection = FakeConnection(self.publisher, self.channel)
        self.connection.refuse_declares = refuse_declares
        self.consumer.attach(self.connection)  # type: ignore[arg-type]
        assert self.consumer.state is ConsumerState.CONSUMING


def consuming(
    behaviour: Callable[[Message], Any],
) -> tuple[Consumer, FakeChannel, Clock, list[str]]:
    setup = Setup(behaviour)
    return setup.consumer, setup.channel, setup.clock, setup.lost


def failing(error: Exception) -> Callable[[Message], None]:
    def handler(message: Message) -> None:
        raise error

    return handler


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


def test_no_ack_goes_to_a_channel_other_than_the_delivery_s() -> None:
    """A delivery from a channel that died is never acked, even on the new channel."""
    pending: Deferred[None] = Deferred()
    consumer, old, clock, lost = consuming(lambda m: pending)
    old.deliver(1)
    old.die()
    assert lost == [
        "channel closed by the broker: 406 PRECONDITION_FAILED - unknown delivery tag 1"
    ]
    new = FakeChannel(clock)
    consumer.attach(FakeConnection(FakeChannel(clock), new))  # type: ignore[arg-type]
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


def test_a_broker_cancel_is_reported() -> None:
    """When the broker cancels the consumer (queue deleted), the owner is told to recover."""
    consumer, channel, _, lost = consuming(lambda m: None)
    assert channel.on_cancelled is not None
    channel.on_cancelled()
    assert consumer.state is ConsumerState.IDLE
    assert lost == ["the broker cancelled the consumer of queue 'q'"]


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


def test_a_failure_is_retried_through_a_retry_queue_then_acked() -> None:
    """A failed message is copied to the 5 s retry queue with its retry count, and acked only after the confirm."""
    setup = Setup(failing(RuntimeError("database down")))
    setup.publisher.auto_confirm = False
    setup.channel.deliver(1, body=b"job", headers={"tenant": "a"})
    assert setup.publisher.published == [
        ("q.retry.5s", b"job", {"tenant": "a", "consumer-svc-retries": 1})
    ]
    assert setup.channel.settled == []
    setup.publisher.confirms[0].callback(None)
    assert setup.channel.settled == [("ack", 1)]


def test_each_retry_waits_twice_as_long() -> None:
    """The second retry goes to the 10 s queue; the retry queues are quorum queues that dead-letter at least once."""
    setup = Setup(failing(RuntimeError("still down")))
    setup.channel.deliver(1, headers={"consumer-svc-retries": 1})
    assert setup.publisher.published[0][0] == "q.retry.10s"
    assert setup.connection.declared["q.retry.5s"] == {
        "x-queue-type": "quorum",
        "x-message-ttl": 5000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "q",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-expires": (5 + 24 * 3600) * 1000,
    }
    assert setup.connection.declared["q.dead"] == {}


def test_after_the_last_retry_the_message_is_dead_lettered_with_its_story() -> None:
    """Past --max-retries the copy goes to the dead-letter queue with why, how often and where from."""
    setup = Setup(failing(ValueError("bad payload")))
    setup.channel.deliver(7, body=b"poison", headers={"consumer-svc-retries": 2, "tenant": "a"})
    [(queue, body, headers)] = setup.publisher.published
    assert (queue, body) == ("q.dead", b"poison")
    assert headers["consumer-svc-failure"] == "ValueError: bad payload (gave up after 3 attempts)"
    assert headers["consumer-svc-attempts"] == 3
    assert headers["consumer-svc-original-routing-key"] == "q"
    assert headers["tenant"] == "a"
    assert "consumer-svc-retries" not in headers
    assert setup.channel.settled == [("ack", 7)]


def test_reject_goes_straight_to_the_dead_letter_queue() -> None:
    """Reject is permanent: no retries."""
    setup = Setup(failing(Reject("malformed")))
    setup.channel.deliver(1)
    assert [p[0] for p in setup.publisher.published] == ["q.dead"]
    assert setup.publisher.published[0][2]["consumer-svc-failure"] == "Reject: malformed"


def test_a_body_that_is_not_json_is_parked_after_one_attempt() -> None:
    """message.json() on a non-JSON body dead-letters the message at once."""
    setup = Setup(lambda m: m.json())
    setup.channel.deliver(1, body=b"{not json")
    [(queue, _, headers)] = setup.publisher.published
    assert queue == "q.dead"
    assert headers["consumer-svc-failure"].startswith(
        "UndecodableBody: body of message 1 (9 bytes) is not JSON"
    )


def test_retry_with_a_delay_of_its_own() -> None:
    """Retry(delay=3) waits on the ladder's next rung, 5 s, in a queue declared on demand."""
    setup = Setup(failing(Retry("rate limited", delay=3)))
    setup.channel.deliver(1)
    assert setup.publisher.published[0][0] == "q.retry.5s"
    assert "q.retry.5s" in setup.connection.declared


def test_a_failed_deferred_is_retried_like_an_exception() -> None:
    """An errback is a failure like a raised exception."""
    pending: Deferred[None] = Deferred()
    setup = Setup(lambda m: pending)
    setup.channel.deliver(1)
    pending.errback(ValueError("nope"))
    assert setup.publisher.published[0][0] == "q.retry.5s"
    assert setup.channel.settled == [("ack", 1)]


def test_when_the_retry_copy_is_not_confirmed_the_original_is_handed_back() -> None:
    """No confirm, no ack: after a pause the original is rejected with requeue, for the broker to redeliver."""
    setup = Setup(failing(RuntimeError("boom")))
    setup.publisher.auto_confirm = False
    setup.channel.deliver(1)
    setup.publisher.confirms[0].errback(NackError([]))
    assert setup.channel.settled == []
    setup.clock.advance(1.0)
    assert setup.channel.settled == [("reject+requeue", 1)]


def test_a_publish_that_is_never_confirmed_times_out() -> None:
    """A retry copy left unconfirmed (say, the connection is blocked) gives up after --publish-timeout."""
    setup = Setup(failing(RuntimeError("boom")))
    setup.publisher.auto_confirm = False
    setup.channel.deliver(1)
    setup.clock.advance(SETTINGS.publish_timeout)
    setup.clock.advance(1.0)
    assert setup.channel.settled == [("reject+requeue", 1)]
    assert setup.clock.getDelayedCalls() == []


def test_the_ack_waits_for_the_handlers_own_publishes() -> None:
    """A handler that forwards a message has its message acked only after the forward was confirmed."""
    setup = Setup(lambda m: m.publish("out", "key", b"forwarded") and None)
    setup.publisher.auto_confirm = False
    setup.channel.deliver(1)
    assert setup.publisher.published == [("key", b"forwarded", {})]
    assert setup.channel.settled == []
    setup.publisher.confirms[0].callback(None)
    assert setup.channel.settled == [("ack", 1)]


def test_a_failed_publish_fails_the_handler() -> None:
    """An unconfirmed forward fails the message, which then goes the retry way."""
    setup = Setup(lambda m: m.publish("out", "key", b"forwarded") and None)
    setup.publisher.auto_confirm = False
    setup.channel.deliver(1)
    setup.publisher.confirms[0].errback(UnroutableError([]))
    setup.publisher.confirms[1].callback(None)  # the retry copy
    assert setup.publisher.published[1][0] == "q.retry.5s"
    assert setup.channel.settled == [("ack", 1)]


def test_a_reply_goes_to_reply_to_with_the_correlation_id() -> None:
    """message.reply answers an RPC request."""
    setup = Setup(lambda m: m.reply(b"pong"))
    method = type(
        "Deliver", (), {"delivery_tag": 1, "routing_key": "q", "exchange": "", "redelivered": False}
    )
    setup.channel.on_message(
        setup.channel, method, BasicProperties(reply_to="amq.gen-1", correlation_id="c-9"), b"ping"
    )
    assert setup.publisher.published == [("amq.gen-1", b"pong", {})]
    assert setup.channel.settled == [("ack", 1)]


def test_draining_hands_back_held_messages_at_once() -> None:
    """A message waiting out its hand-back pause is handed back as soon as the stop begins."""
    setup = Setup(failing(RuntimeError("boom")))
    setup.publisher.auto_confirm = False
    setup.channel.deliver(1)
    setup.publisher.confirms[0].errback(NackError([]))
    drained = setup.consumer.drain(timeout=30)
    assert drained.called
    assert setup.channel.settled == [("reject+requeue", 1)]
    assert setup.clock.getDelayedCalls() == []


def test_a_handler_past_its_timeout_is_cancelled_and_retried() -> None:
    """--handler-timeout cancels a pending handler (checked once a second); it counts as a failure and goes the retry way."""
    pending: Deferred[None] = Deferred()
    setup = Setup(lambda m: pending)
    setup.channel.deliver(1)
    setup.clock.advance(SETTINGS.handler_timeout - 1)
    assert not pending.called
    setup.clock.advance(1)
    assert pending.called
    [(queue, _, _)] = setup.publisher.published
    assert queue == "q.retry.5s"
    assert setup.channel.settled == [("ack", 1)]
    assert setup.clock.getDelayedCalls() == []  # nothing pending: the sweep stopped


def test_a_retry_queue_that_cannot_be_declared_never_stops_consuming() -> None:
    """A refused declare (say, its node is down) hands the failure back after a pause; consuming goes on."""
    setup = Setup(
        failing(RuntimeError("boom")),
        refuse_declares=ChannelClosedByBroker(
            404, "NOT_FOUND - home node 'n3@host' of durable queue 'q.retry.5s' is down"
        ),
    )
    setup.channel.deliver(1)
    assert setup.publisher.published == []
    setup.clock.advance(1.0)
    assert setup.channel.settled == [("reject+requeue", 1)]
    assert setup.lost == []
    assert setup.consumer.state is ConsumerState.CONSUMING
    # Back again: the next failure is retried as usual.
    setup.connection.refuse_declares = None
    setup.channel.deliver(2)
    assert [p[0] for p in setup.publisher.published] == ["q.retry.5s"]
    assert setup.channel.settled[-1] == ("ack", 2)


def test_a_dead_letter_queue_with_other_arguments_is_fatal() -> None:
    """A 406 on our own queue cannot be fixed by retrying: the service is told to stop."""
    fatal: list[Exception] = []
    consumer = Consumer(SETTINGS, Invoke(failing(Reject("bad"))), Clock(), lambda reason: None)  # type: ignore[arg-type]
    consumer.on_fatal = fatal.append
    connection = FakeConnection(FakeChannel(), FakeChannel())
    connection.refuse_declares = ChannelClosedByBroker(
        406, "PRECONDITION_FAILED - inequivalent arg 'x-max-length'"
    )
    consumer.attach(connection)  # type: ignore[arg-type]
    assert consumer.state is ConsumerState.CONSUMING
    assert "queue 'q.dead' exists with other arguments" in str(fatal[0])


def test_a_copy_the_broker_refuses_is_parked_bare_without_a_reconnect() -> None:
    """Refused twice (once on its own), the body is parked without its headers; the channel is reopened, not the connection."""
    setup = Setup(failing(RuntimeError("boom")))
    reopened = FakeChannel(setup.clock)
    again = FakeChannel(setup.clock)
    setup.connection.channels = [reopened, again]
    refusal = ChannelClosedByBroker(406, "PRECONDITION_FAILED - user_id property set to 'p'")

    def refuse(channel: FakeChannel) -> None:
        def publish(*args: Any, **kwargs: Any) -> Deferred[Any]:
            channel.is_open = False
            channel.closed.callback(refusal)
            return fail(refusal)

        channel.publish = publish  # type: ignore[method-assign]

    refuse(setup.publisher)
    refuse(reopened)
    setup.channel.deliver(1, body=b"job", headers={"tenant": "a"})
    setup.clock.advance(0)
    [(queue, body, headers)] = again.published
    assert (queue, body) == ("q.dead", b"job")
    assert "tenant" not in headers
    assert "the broker refused its copy" in headers["consumer-svc-failure"]
    assert headers["consumer-svc-stripped"] == "every original header and property"
    assert setup.channel.settled == [("ack", 1)]
    assert setup.lost == []


def test_an_innocent_copy_refused_with_a_guilty_one_is_retried_in_full() -> None:
    """A copy failing only because another publish closed the channel keeps its headers when published again."""
    setup = Setup(failing(RuntimeError("boom")))
    reopened = FakeChannel(setup.clock)
    setup.connection.channels = [reopened]
    refusal = ChannelClosedByBroker(406, "PRECONDITION_FAILED - refused")

    def publish(*args: Any, **kwargs: Any) -> Deferred[Any]:
        setup.publisher.is_open = False
        setup.publisher.closed.callback(refusal)
        return fail(refusal)

    setup.publisher.publish = publish  # type: ignore[method-assign]
    setup.channel.deliver(1, headers={"tenant": "a"})
    [(queue, _, headers)] = reopened.published
    assert queue == "q.retry.5s"
    assert headers == {"tenant": "a", "consumer-svc-retries": 1}
    assert setup.channel.settled == [("ack", 1)]


def test_a_message_whose_headers_cannot_be_decoded_is_parked_without_running_the_handler() -> None:
    """The codec hands over UndecodableHeaders: the message goes to the dead-letter queue, unhandled."""
    from consumer_svc._codec import UndecodableHeaders

    setup = Setup(lambda m: None)
    setup.channel.deliver(3, body=b"odd", headers=UndecodableHeaders("a table ends mid-value"))
    [(queue, body, headers)] = setup.publisher.published
    assert (queue, body) == ("q.dead", b"odd")
    assert headers["consumer-svc-failure"] == "UndecodableHeaders: a table ends mid-value"
    assert setup.consumer.invoke.seen == []  # type: ignore[attr-defined]
    assert setup.channel.settled == [("ack", 3)]


def test_a_value_that_cannot_be_encoded_is_left_off_the_copy_and_named() -> None:
    """An int beyond int64 cannot be republished: the copy goes without it and says so."""
    setup = Setup(failing(RuntimeError("boom")))
    setup.channel.deliver(1, headers={"big": 2**70, "ok": 1})
    [(_, _, headers)] = setup.publisher.published
    assert "big" not in headers
    assert headers["ok"] == 1
    assert headers["consumer-svc-stripped"] == "big"
