"""Settling messages: the rules of ack, reject and requeue, with a fake channel and a Clock.

The fakes are the testing kit's own (consumer_svc.testing); the same behaviours are checked
against a real broker in tests/broker/test_service.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Callable

from pika.exceptions import ChannelClosedByBroker, NackError, UnroutableError
from pika.spec import BasicProperties
from support.consuming import SETTINGS, Scripted
from support.logs import Logs, captured
from support.state import fired
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, formatEvent

from consumer_svc import Message, Reject, Retry
from consumer_svc._consumer import Consumer
from consumer_svc._states import Event, Facts, State, Transition
from consumer_svc.testing import FakeChannel, FakeConnection
from consumer_svc.testing._fakes import Sent, connect, invoker


class Setup:
    """A consumer attached to fake channels, with a Clock."""

    def __init__(
        self,
        behaviour: Callable[[Message], Any],
        refuse_declares: Exception | None = None,
        state: State = State.CONSUMING,
        **settings: Any,
    ) -> None:
        self.clock = Clock()
        self.publisher = FakeChannel(self.clock)
        self.channel = FakeChannel(self.clock)
        self.lost: list[str] = []
        self.paused: list[str | None] = []
        self.fatal: list[Exception] = []
        self.handler = Scripted(behaviour)
        self.consumer = Consumer(
            dataclasses.replace(SETTINGS, **settings), invoker(self.handler), self.clock
        )
        self.consumer.machine.subscribe(self.note)
        self.connection = FakeConnection(self.publisher, self.channel)
        self.connection.refuse_declares = refuse_declares
        connect(self.consumer.machine, self.connection)
        assert self.consumer.state is state

    def note(self, t: Transition) -> None:
        """What the service would hear: losses, pauses (their causes) and resumes (None), fatal errors."""
        if t.event is Event.SUBSCRIPTION_LOST:
            self.lost.append(t.facts.reason)
        elif t.event is Event.PAUSE:
            self.paused.append(t.facts.reason)
        elif t.event is Event.RESUME:
            self.paused.append(None)
        elif t.event is Event.FAIL and t.facts.error is not None:
            self.fatal.append(t.facts.error)


def consuming(
    behaviour: Callable[[Message], Any],
) -> tuple[Consumer, FakeChannel, Clock, list[str]]:
    setup = Setup(behaviour)
    return setup.consumer, setup.channel, setup.clock, setup.lost


def stop(consumer: Consumer, timeout: float) -> Deferred[None]:
    """Stop as the service does: the machine first (nothing new is taken), then the drain."""
    consumer.machine.fire(Event.STOP, Facts(timeout=timeout))
    return consumer.drain(timeout)


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
    connect(consumer.machine, FakeConnection(FakeChannel(clock), new))
    pending.callback(None)
    assert old.settled == []
    assert new.settled == []
    assert not consumer.inflight


def test_draining_waits_for_in_flight_messages_and_acks_them() -> None:
    """On stop the consumer is cancelled, and a handler that finishes in time is acked."""
    pending: Deferred[None] = Deferred()
    consumer, channel, clock, _ = consuming(lambda m: pending)
    channel.deliver(1)
    drained = stop(consumer, 30)
    assert channel.cancelled
    assert not fired(drained)
    clock.advance(10)
    pending.callback(None)
    assert fired(drained)
    assert channel.settled == [("ack", 1)]
    assert clock.getDelayedCalls() == []


def test_the_deadline_hands_back_what_is_still_running() -> None:
    """At the deadline a still-running handler is cancelled and its message requeued; a late success is ignored."""
    pending: Deferred[None] = Deferred()
    consumer, channel, clock, _ = consuming(lambda m: pending)
    channel.deliver(1)
    drained = stop(consumer, 30)
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
    stop(consumer, 5)
    clock.advance(5)
    late.callback(None)  # the handler's own code fires it anyway
    assert channel.settled == [("requeue", 1)]


def test_messages_arriving_while_draining_are_handed_back_at_once() -> None:
    """A delivery that crossed our cancel in flight is requeued without calling the handler."""
    invoke_calls: list[int] = []
    consumer, channel, _, _ = consuming(lambda m: invoke_calls.append(m.delivery_tag))
    stop(consumer, 30)
    channel.deliver(9)
    assert channel.settled == [("requeue", 9)]
    assert invoke_calls == []


def test_a_broker_cancel_is_reported() -> None:
    """When the broker cancels the consumer (queue deleted), the owner is told to recover."""
    consumer, channel, _, lost = consuming(lambda m: None)
    assert channel.on_cancelled is not None
    channel.on_cancelled()
    assert consumer.state is State.WAITING
    assert lost == ["the broker cancelled the consumer of queue 'q'"]


def test_a_handler_holding_the_reactor_is_named_in_a_warning() -> None:
    """A synchronous call that holds the reactor for over a second is logged with the handler's name."""
    now = [0.0]

    def hog(message: Message) -> None:
        now[0] += 7.0  # seven seconds of the reactor's time

    with captured() as logs:
        consumer, channel, _, _ = consuming(hog)
        consumer.monotonic = lambda: now[0]
        channel.deliver(1)
    [stall] = [e for e in logs.events if "stall_seconds" in e]
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


def request(setup: Setup, tag: int, reply_to: str | None) -> None:
    """Deliver an RPC request asking for a reply to ``reply_to``."""
    properties = BasicProperties(reply_to=reply_to, correlation_id="c-9")
    setup.channel.deliver(tag, b"ping", properties=properties)


def test_a_reply_goes_to_reply_to_with_the_correlation_id() -> None:
    """message.reply answers an RPC request in a server-named queue or through direct reply-to."""
    setup = Setup(lambda m: m.reply(b"pong"))
    request(setup, 1, "amq.gen-1")
    request(setup, 2, "amq.rabbitmq.reply-to.g1h2AA5yZXBseQ==")
    assert setup.publisher.published == [
        ("amq.gen-1", b"pong", {}),
        ("amq.rabbitmq.reply-to.g1h2AA5yZXBseQ==", b"pong", {}),
    ]
    assert setup.channel.settled == [("ack up to", 2)]  # coalesced into one multiple-ack


def test_a_reply_to_any_other_queue_is_never_published_and_parked() -> None:
    """A reply_to naming an ordinary queue is a Reject: nothing goes there, the request is parked at once, with why."""
    setup = Setup(lambda m: m.reply(b"pong"))
    request(setup, 1, "payments")
    [(queue, body, headers)] = setup.publisher.published
    assert (queue, body) == ("q.dead", b"ping")
    assert headers["consumer-svc-failure"].startswith(
        "Reject: reply_to 'payments' is not a queue replies may go to "
        "(amq.gen-*, amq.rabbitmq.reply-to*; see --reply-to-allow)"
    )
    assert headers["consumer-svc-attempts"] == 1
    assert setup.channel.settled == [("ack", 1)]  # acked once its parked copy was confirmed


def test_a_refused_reply_parks_the_message_even_if_the_handler_ignores_it() -> None:
    """A handler that drops reply()'s Deferred still has its message parked, not acked."""
    setup = Setup(lambda m: m.reply(b"pong") and None)
    request(setup, 1, "payments")
    assert [p[0] for p in setup.publisher.published] == ["q.dead"]


def test_a_missing_reply_to_is_parked_not_retried() -> None:
    """Retrying cannot give a request a reply_to: it is a Reject, parked after one attempt."""
    setup = Setup(lambda m: m.reply(b"pong"))
    request(setup, 1, None)
    [(queue, _, headers)] = setup.publisher.published
    assert queue == "q.dead"
    assert headers["consumer-svc-failure"] == "Reject: the request has no reply_to to answer"


def test_reply_to_allow_lets_replies_reach_more_queues() -> None:
    """--reply-to-allow globs add queues replies may go to; the rest are still refused."""
    setup = Setup(lambda m: m.reply(b"pong"))
    setup.consumer.settings = dataclasses.replace(SETTINGS, reply_to_allow=("rpc.*",))
    request(setup, 1, "rpc.replies.7")
    request(setup, 2, "payments")
    assert [p[0] for p in setup.publisher.published] == ["rpc.replies.7", "q.dead"]


def test_draining_hands_back_held_messages_at_once() -> None:
    """A message waiting out its hand-back pause is handed back as soon as the stop begins."""
    setup = Setup(failing(RuntimeError("boom")))
    setup.publisher.auto_confirm = False
    setup.channel.deliver(1)
    setup.publisher.confirms[0].errback(NackError([]))
    drained = stop(setup.consumer, 30)
    assert drained.called
    assert setup.channel.settled == [("reject+requeue", 1)]
    assert setup.clock.getDelayedCalls() == []


def test_a_handler_past_its_timeout_is_cancelled_and_retried() -> None:
    """--handler-timeout cancels a pending handler (checked once a second); it counts as a failure and goes the retry way."""
    pending: Deferred[None] = Deferred()
    setup = Setup(lambda m: pending)
    setup.channel.deliver(1)
    setup.clock.advance(SETTINGS.handler_timeout - 1)
    assert not fired(pending)
    setup.clock.advance(1)
    assert fired(pending)  # cancelled
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
    assert setup.consumer.state is State.CONSUMING
    # Back again: the next failure is retried as usual.
    setup.connection.refuse_declares = None
    setup.channel.deliver(2)
    assert [p[0] for p in setup.publisher.published] == ["q.retry.5s"]
    assert setup.channel.settled[-1] == ("ack", 2)


def test_a_dead_letter_queue_with_other_arguments_is_fatal() -> None:
    """A 406 on our own queue cannot be fixed by retrying: the service is told to stop."""
    setup = Setup(
        failing(Reject("bad")),
        refuse_declares=ChannelClosedByBroker(
            406, "PRECONDITION_FAILED - inequivalent arg 'x-max-length'"
        ),
        state=State.FAILED,
    )
    assert "queue 'q.dead' exists with other arguments" in str(setup.fatal[0])


def refusing(channel: FakeChannel, refusal: Exception) -> None:
    """The broker refuses the next publish on ``channel``, closing the channel as it does."""

    def refuse(sent: Sent) -> None:
        channel.is_open = False
        channel.closed.callback(refusal)
        sent.confirm.errback(refusal)

    channel.on_publish = refuse


def test_a_copy_the_broker_refuses_is_parked_bare_without_a_reconnect() -> None:
    """Refused twice (once on its own), the body is parked without its headers; the channel is reopened, not the connection."""
    setup = Setup(failing(RuntimeError("boom")))
    reopened = FakeChannel(setup.clock)
    again = FakeChannel(setup.clock)
    setup.connection.channels = [reopened, again]
    refusal = ChannelClosedByBroker(406, "PRECONDITION_FAILED - user_id property set to 'p'")

    refusing(setup.publisher, refusal)
    refusing(reopened, refusal)
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

    refusing(setup.publisher, refusal)
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
    assert setup.handler.seen == []
    assert setup.channel.settled == [("ack", 3)]


def test_a_value_that_cannot_be_encoded_is_left_off_the_copy_and_named() -> None:
    """An int beyond int64 cannot be republished: the copy goes without it and says so."""
    setup = Setup(failing(RuntimeError("boom")))
    setup.channel.deliver(1, headers={"big": 2**70, "ok": 1})
    [(_, _, headers)] = setup.publisher.published
    assert "big" not in headers
    assert headers["ok"] == 1
    assert headers["consumer-svc-stripped"] == "big"


def test_a_handler_returning_a_generator_is_retried_never_acked() -> None:
    """A generator returned at run time (an @inlineCallbacks forgotten) fails the message: retried, not acked unrun."""

    def forgot_inline_callbacks(message: Message) -> Any:
        def work() -> Any:
            yield None

        return work()

    clock = Clock()
    publisher, channel = FakeChannel(clock), FakeChannel(clock)
    consumer = Consumer(SETTINGS, invoker(forgot_inline_callbacks), clock)
    connect(consumer.machine, FakeConnection(publisher, channel))
    channel.deliver(1)
    [(queue, _, headers)] = publisher.published
    assert queue == "q.retry.5s"
    assert headers["consumer-svc-retries"] == 1
    assert channel.settled == [("ack", 1)]  # acked only once its retry copy was confirmed


def failure_lines(logs: Logs) -> list[LogEvent]:
    return [
        e for e in logs.events if e.get("log_format", "").startswith("Handler {handler} failed")
    ]


def test_a_handler_failure_is_a_warning_with_its_traceback() -> None:
    """An exception from the handler is expected in a service's life: logged at warn, traceback kept (text and JSON)."""
    from consumer_svc import json_lines

    with captured() as logs:
        setup = Setup(failing(RuntimeError("database down")))
        setup.channel.deliver(1)
    [event] = failure_lines(logs)
    assert event["log_level"] is LogLevel.warn
    assert event["log_failure"].check(RuntimeError)
    out = io.StringIO()
    json_lines(out)(event)
    record = json.loads(out.getvalue())
    assert record["level"] == "warn"
    assert "RuntimeError: database down" in record["traceback"]


def test_reject_and_retry_are_warnings_without_a_traceback() -> None:
    """A handler's own decision is no surprise: a warning, one line."""
    with captured() as logs:
        Setup(failing(Reject("malformed"))).channel.deliver(1)
        Setup(failing(Retry("later"))).channel.deliver(1)
    lines = failure_lines(logs)
    assert [e["log_level"] for e in lines] == [LogLevel.warn, LogLevel.warn]
    assert all("log_failure" not in e for e in lines)


def deliver_with_id(channel: FakeChannel, tag: int, message_id: str | None) -> None:
    channel.deliver(tag, properties=BasicProperties(message_id=message_id))


def test_log_lines_name_a_message_by_its_id_else_by_tag_and_channel() -> None:
    """A message_id names the message; without one, the tag and which consuming channel it came on, so tag 1 after a reconnect is not tag 1 before."""
    with captured() as logs:
        setup = Setup(failing(RuntimeError("boom")))
        deliver_with_id(setup.channel, 1, "order-42")
        deliver_with_id(setup.channel, 2, None)
        setup.channel.die()
        again = FakeChannel(setup.clock)
        connect(setup.consumer.machine, FakeConnection(FakeChannel(setup.clock), again))
        deliver_with_id(again, 1, None)
    names = [e["message_name"] for e in failure_lines(logs)]
    assert names == ["message 'order-42'", "message 2 of channel 1", "message 1 of channel 2"]
    [first, *_] = failure_lines(logs)
    assert (first["message_id"], first["channel"], first["tag"]) == ("order-42", 1, 1)
    assert formatEvent(first).startswith(
        "Handler tests.handler failed on message 'order-42' (attempt 1): RuntimeError: boom"
    )


def test_a_hostile_message_id_cannot_forge_log_lines() -> None:
    """Control characters and bidi overrides in a message_id are escaped, and a long one is cut."""
    message = Message(
        b"x",
        BasicProperties(message_id="evil\n[consumer_svc#info] Stopped\u202e" + "x" * 200),
        delivery_tag=1,
        routing_key="q",
        exchange="",
        redelivered=False,
    )
    assert "\n" not in message.name
    assert "\u202e" not in message.name
    assert message.name.startswith("message 'evil\\n[consumer_svc#info] Stopped\\u202e")
    assert len(message.name) < 100


# -- concurrency apart from prefetch


def test_no_more_handlers_run_than_the_concurrency_and_the_rest_wait_in_order() -> None:
    """With --concurrency 2, the third and fourth deliveries wait; each finish starts the next."""
    pending: dict[int, Deferred[None]] = {}

    def slow(message: Message) -> Deferred[None]:
        pending[message.delivery_tag] = Deferred()
        return pending[message.delivery_tag]

    setup = Setup(slow, concurrency=2)
    for tag in (1, 2, 3, 4):
        setup.channel.deliver(tag)
    assert setup.handler.seen == [1, 2]
    pending[1].callback(None)
    assert setup.handler.seen == [1, 2, 3]
    # The ack covers message 1 only: 2 and 3 run, 4 waits, none of them is acked.
    assert setup.channel.settled == [("ack", 1)]
    for tag in (2, 3):
        pending[tag].callback(None)
    pending[4].callback(None)
    assert setup.channel.settled[-1] == ("ack up to", 4)


def test_prefetch_defaults_above_concurrency_so_messages_wait_ready() -> None:
    """The consumer asks the broker for twice --concurrency messages ahead."""
    setup = Setup(lambda m: None, concurrency=3, prefetch=0)
    assert setup.channel.prefetches == [6]


def test_waiting_messages_are_handed_back_at_once_on_stop() -> None:
    """A drain hands back what never started and waits only for running handlers."""
    pending: Deferred[None] = Deferred()
    setup = Setup(lambda m: pending, concurrency=1)
    setup.channel.deliver(1)
    setup.channel.deliver(2)
    drained = stop(setup.consumer, 30)
    assert setup.channel.settled == [("requeue", 2)]
    pending.callback(None)
    assert drained.called
    assert setup.channel.settled[-1] == ("ack", 1)


# -- pausing on a failing downstream


def test_enough_failures_in_a_row_pause_then_a_probe_resumes() -> None:
    """Three failures in a row pause; the probe after the retry delay succeeds, and consuming resumes at full prefetch."""
    down = {"db": True}

    def handler(message: Message) -> None:
        if down["db"]:
            raise RuntimeError("db down")

    setup = Setup(handler, pause_after=3)
    for tag in (1, 2, 3):
        setup.channel.deliver(tag)
    assert setup.paused == ["3 failures in a row, the last: RuntimeError: db down"]
    assert setup.channel.cancelled
    # The three failures were attempts: each went to a retry queue.
    assert [p[0] for p in setup.publisher.published] == ["q.retry.5s"] * 3
    setup.channel.deliver(4)  # between our cancel and the broker's cancel-ok
    assert ("requeue", 4) in setup.channel.settled
    setup.clock.advance(5)
    assert setup.channel.prefetches[-1] == 1
    down["db"] = False
    setup.channel.deliver(5)
    assert setup.paused[-1] is None
    assert setup.channel.prefetches[-1] == SETTINGS.prefetch
    assert setup.channel.settled[-1] == ("ack", 5)
    assert setup.consumer.paused is None


def test_a_failed_probe_hands_the_message_back_and_waits_twice_as_long() -> None:
    """A probe that fails is no attempt (no retry copy); the next probe comes after double the wait."""
    setup = Setup(failing(RuntimeError("db down")), pause_after=1)
    setup.channel.deliver(1)
    published = len(setup.publisher.published)
    setup.clock.advance(5)
    setup.channel.deliver(2)
    assert setup.channel.settled[-1] == ("requeue", 2)
    assert len(setup.publisher.published) == published
    assert setup.channel.subscriptions == 2  # the first one, then the probe at 5 s
    setup.clock.advance(9.9)
    assert setup.channel.subscriptions == 2
    setup.clock.advance(0.1)
    assert setup.channel.subscriptions == 3
    assert setup.channel.prefetches[-1] == 1


def test_a_handler_can_ask_for_a_pause() -> None:
    """Pause("db down", delay=30) hands its message back unharmed and probes after 30 s."""
    from consumer_svc import Pause

    setup = Setup(failing(Pause("db down", delay=30)))
    setup.channel.deliver(1)
    assert setup.channel.settled == [("requeue", 1)]
    assert setup.publisher.published == []
    assert setup.paused == ["Pause: db down"]
    setup.clock.advance(29)
    assert setup.channel.subscriptions == 1
    setup.clock.advance(1)
    assert setup.channel.subscriptions == 2


def test_poison_messages_among_good_ones_never_pause() -> None:
    """A failure between successes is a bad message, not a downstream outage: retried, never paused."""
    setup = Setup(lambda m: m.json(), pause_after=2)
    for tag in range(1, 9):
        setup.channel.deliver(tag, body=b"{}" if tag % 2 else b"not json")
    assert setup.paused == []
    setup2 = Setup(
        lambda m: (_ for _ in ()).throw(RuntimeError("x")) if m.delivery_tag % 2 else None,
        pause_after=2,
    )
    for tag in range(1, 9):
        setup2.channel.deliver(tag)
    assert setup2.paused == []


def test_rejects_in_a_row_do_not_pause() -> None:
    """Reject is about the message: parked at once, however many in a row."""
    setup = Setup(failing(Reject("bad")), pause_after=2)
    for tag in range(1, 6):
        setup.channel.deliver(tag)
    assert setup.paused == []
    assert [p[0] for p in setup.publisher.published] == ["q.dead"] * 5


def test_the_operator_pauses_and_resumes_without_probes() -> None:
    """An operator's pause takes no messages and schedules nothing until resumed."""
    setup = Setup(lambda m: None)
    setup.consumer.pause("paused by the operator", by_operator=True)
    assert setup.clock.getDelayedCalls() == []
    setup.channel.deliver(1)
    assert setup.channel.settled == [("requeue", 1)]
    setup.consumer.resume()
    assert setup.paused == ["paused by the operator", None]
    setup.channel.deliver(2)
    assert setup.channel.settled[-1] == ("ack", 2)


def test_stopping_while_paused_leaves_no_timer() -> None:
    """A drain cancels the next probe."""
    setup = Setup(failing(RuntimeError("down")), pause_after=1)
    setup.channel.deliver(1)
    stop(setup.consumer, 30)
    setup.clock.advance(0)  # the acks' flush
    assert setup.clock.getDelayedCalls() == []


def test_a_subscription_that_delivers_nothing_while_messages_wait_is_recovered() -> None:
    """No delivery for a whole --stall-check interval with room to spare and ready messages: reported lost."""
    setup = Setup(lambda m: None, stall_check=60)
    setup.connection.ready = 5
    setup.clock.advance(60)
    [reason] = setup.lost
    assert "no delivery for 60s though queue 'q' holds 5 ready message(s)" in reason


def test_an_idle_queue_is_no_stall() -> None:
    """Nothing delivered because nothing is ready: all is well."""
    setup = Setup(lambda m: None, stall_check=60)
    setup.clock.advance(180)
    assert setup.lost == []


def test_busy_handlers_are_no_stall() -> None:
    """With every slot taken, no delivery is expected, whatever waits in the queue."""
    setup = Setup(lambda m: Deferred(), stall_check=60, concurrency=1, prefetch=1)
    setup.channel.deliver(1)
    setup.connection.ready = 5
    setup.clock.advance(60)
    assert setup.lost == []
