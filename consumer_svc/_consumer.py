"""The consumer: sets up the channels, hands deliveries to the handler, settles each one.

A message is acked only after its handler succeeded (and every publish the
handler made was confirmed), or after a confirmed copy of it was parked in a
retry queue or the dead-letter queue. Acks go only to the channel the message
came from: a delivery whose channel died is left for the broker to redeliver,
even if its handler later succeeds.
"""

from __future__ import annotations

import copy
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pika import exceptions as pika_errors
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._acks import Acks
from ._amqp import AMQPConnection, Channel
from ._errors import AccessRefused, Reject, Retry, TopologyMismatch
from ._handler import Invoker
from ._message import Message
from ._publisher import Publisher
from ._retry import (
    Action,
    Decision,
    RetryPolicy,
    dead_letter_headers,
    describe_failure,
    retries_of,
    retry_headers,
    retry_queue,
)
from ._settings import Settings

log = Logger(namespace="consumer_svc.consumer")

#: A non-blocking handler that holds the reactor this long (seconds) is warned about.
STALL_WARNING = 1.0
#: Seconds a message is held before it is handed back when it could not be parked.
HAND_BACK_PAUSE = 1.0


class ConsumerState(enum.Enum):
    """Where the consumer is."""

    IDLE = "idle"  # no channel
    SETTING_UP = "setting up"  # channels opening, declaring, subscribing
    CONSUMING = "consuming"
    DRAINING = "draining"  # stopping: no new messages, waiting for in-flight ones
    STOPPED = "stopped"


class Phase(enum.Enum):
    """Where one message is between its arrival and its settlement."""

    HANDLING = "handling"  # the handler runs
    PUBLISHING = "publishing"  # waiting for confirms: the handler's publishes, or its parked copy
    HOLDING = "holding"  # could not be parked: held briefly, then handed back
    SETTLED = "settled"


class Outcome(enum.Enum):
    """How a message left us (the names are the metrics' outcome labels)."""

    ACKED = "acked"  # the handler succeeded
    RETRIED = "retried"  # acked once a confirmed copy waits in a retry queue
    DEAD_LETTERED = "dead_lettered"  # acked once a confirmed copy is in the dead-letter queue
    REJECTED = "rejected"  # basic.reject + requeue: it failed and could not be parked
    REQUEUED = "requeued"  # basic.nack + requeue: not processed (stopping, deadline)


@dataclass(eq=False)
class Delivery:
    """One message between its arrival and its settlement."""

    acks: Acks  # of the channel it came from
    message: Message
    started: float = 0.0
    phase: Phase = Phase.HANDLING
    result: Deferred[Any] | None = None
    #: When a pending handler runs out of --handler-timeout (the clock's seconds).
    deadline: float = 0.0
    #: The hand-back pause while holding.
    timer: IDelayedCall | None = None
    timed_out: bool = False
    #: Set at the shutdown deadline: whatever happens to it next is ignored.
    abandoned: bool = False


class SetupFailed(Exception):
    """Setting up the channels failed in a way that a reconnect may fix."""


@dataclass
class Consumer:
    """Consumes one queue through whichever channel is current."""

    settings: Settings
    invoke: Invoker
    clock: IReactorTime
    #: Called when a channel or the subscription is lost while the
    #: connection stays up; the owner recovers (reconnects).
    on_lost: Callable[[str], None]
    #: Real elapsed time, to catch handlers that hold the reactor.
    monotonic: Callable[[], float] = time.monotonic
    #: Called with each settled message's outcome (metrics).
    on_outcome: Callable[[Outcome], None] = lambda outcome: None
    #: Called with how long each handler took, in seconds (metrics).
    on_handled: Callable[[float], None] = lambda seconds: None
    state: ConsumerState = ConsumerState.IDLE
    channel: Channel | None = None
    #: The current channel's acks; a delivery from an older channel holds an older one.
    acks: Acks | None = None
    consumer_tag: str | None = None
    inflight: set[Delivery] = field(default_factory=set)
    #: Deliveries handed back at the shutdown deadline while their handler ran on.
    abandoned: int = 0
    publisher: Publisher = field(init=False)
    policy: RetryPolicy = field(init=False)
    _declared: set[str] = field(default_factory=set)
    _drained: Deferred[None] | None = None
    _deadline: IDelayedCall | None = None
    _sweeper: LoopingCall | None = None

    def __post_init__(self) -> None:
        self.publisher = Publisher(self.clock, self.settings.publish_timeout)
        self.policy = RetryPolicy(self.settings.max_retries, self.settings.retry_delay)

    # -- setting up

    @inlineCallbacks
    def attach(self, connection: AMQPConnection) -> Any:
        """Open the channels, declare the topology, set QoS and subscribe.

        Fails with a `FatalError` for what retrying cannot fix (permissions,
        mismatched arguments) and with `SetupFailed` otherwise.
        """
        self.state = ConsumerState.SETTING_UP
        self._declared = set()
        try:
            publishing: Channel = yield connection.open_channel()
            publishing.closed.addCallback(self._channel_closed, publishing, "publisher channel")
            yield publishing.confirm()
            yield self._declare_failure_queues(publishing)
            self.publisher.channel = publishing
            channel: Channel = yield connection.open_channel()
            self.channel = channel
            self.acks = Acks(channel)
            channel.closed.addCallback(self._channel_closed, channel, "channel")
            channel.on_cancelled = self._cancelled_by_broker
            yield self._declare(channel)
            yield channel.qos(self.settings.prefetch)
            self.consumer_tag = yield channel.consume(self.settings.queue, self._on_message)
        except pika_errors.ChannelClosedByBroker as e:
            raise self._setup_error(e) from None
        if self.state is ConsumerState.SETTING_UP:
            self.state = ConsumerState.CONSUMING

    @inlineCallbacks
    def _declare_failure_queues(self, channel: Channel) -> Any:
        s = self.settings
        yield self._declare_queue(channel, s.dead_letter_queue, {})
        for retry in range(1, s.max_retries + 1):
            name, arguments = retry_queue(s.queue, self.policy.schedule(retry))
            yield self._declare_queue(channel, name, arguments)

    def _declare_queue(
        self, channel: Channel, name: str, arguments: dict[str, Any]
    ) -> Deferred[Any]:
        if name in self._declared:
            return succeed(None)

        def declared(result: object) -> object:
            self._declared.add(name)
            return result

        def mismatch(failure: Failure) -> Failure:
            error = failure.value
            if isinstance(error, pika_errors.ChannelClosedByBroker) and error.reply_code == 406:
                failure = Failure(
                    TopologyMismatch(
                        f"queue {name!r} exists with other arguments: we declare {arguments!r}, "
                        f"the broker says {error.reply_code} {error.reply_text}"
                    )
                )
            return failure

        return channel.declare_queue(name, arguments=arguments).addCallbacks(declared, mismatch)

    def _declare(self, channel: Channel) -> Deferred[Any]:
        s = self.settings
        if not s.declare:
            return channel.declare_queue(s.queue, passive=True, arguments={})

        @inlineCallbacks
        def declare() -> Any:
            yield channel.declare_queue(s.queue, arguments=s.queue_arguments)
            if s.exchange:
                yield channel.declare_exchange(s.exchange, s.exchange_type)
                for key in s.routing_keys or ("",):
                    yield channel.bind(s.queue, s.exchange, key)

        return declare()

    def _setup_error(self, e: pika_errors.ChannelClosedByBroker) -> Exception:
        s = self.settings
        text = f"{e.reply_code} {e.reply_text}"
        if e.reply_code == 403:
            return AccessRefused(
                f"the broker refused an operation on queue {s.queue!r}: {text} "
                f"(user {s.url.username!r}, vhost {s.url.vhost!r})"
            )
        if e.reply_code == 406:
            return TopologyMismatch(
                f"queue {s.queue!r} or its exchange exists with other arguments than configured "
                f"(we declare {dict(s.queue_arguments)!r}): {text}"
            )
        if e.reply_code == 404 and not s.declare:
            return SetupFailed(f"queue {s.queue!r} does not exist (--no-declare): {text}")
        return SetupFailed(text)

    def _channel_closed(self, reason: BaseException, channel: Channel, which: str) -> None:
        if channel is self.publisher.channel:
            self.publisher.channel = None
        elif channel is self.channel:
            self.channel = None
            self.acks = None
            self.consumer_tag = None
        else:
            return
        # Only a channel-level close is ours to report: when the whole
        # connection goes, the connection's own loss tells the story.
        if self.state is ConsumerState.CONSUMING and isinstance(
            reason, pika_errors.ChannelClosedByBroker
        ):
            self.state = ConsumerState.IDLE
            self.on_lost(f"{which} closed by the broker: {_reason(reason)}")

    def _cancelled_by_broker(self) -> None:
        """The broker cancelled us (queue deleted, leader moved): start afresh."""
        if self.state is not ConsumerState.CONSUMING:
            return
        self.consumer_tag = None
        self.state = ConsumerState.IDLE
        self.on_lost(f"the broker cancelled the consumer of queue {self.settings.queue!r}")

    def detach(self) -> None:
        """The connection is gone: deliveries in flight can no longer be settled."""
        self.channel = None
        self.acks = None
        self.publisher.channel = None
        self.consumer_tag = None
        if self.state in (ConsumerState.SETTING_UP, ConsumerState.CONSUMING):
            self.state = ConsumerState.IDLE

    # -- the per-message path

    def _on_message(self, channel: Channel, method: Any, properties: Any, body: bytes) -> None:
        tag = method.delivery_tag
        acks = self.acks
        if acks is None or acks.channel is not channel:
            return  # a straggler from a channel we gave up on: the broker redelivers it
        acks.delivered(tag)
        if self.state in (ConsumerState.DRAINING, ConsumerState.STOPPED):
            # Delivered between our cancel and the broker's cancel-ok: hand it back.
            acks.nack(tag)
            return
        message = Message(
            body,
            properties,
            delivery_tag=tag,
            routing_key=method.routing_key,
            exchange=method.exchange,
            redelivered=method.redelivered,
        )
        message._publisher = self.publisher
        started = self.monotonic()
        delivery = Delivery(acks, message, started)
        self.inflight.add(delivery)
        try:
            result = self.invoke(message)
        except Exception:
            self._failed(Failure(), delivery)
            return
        finally:
            held = self.monotonic() - started
            if held >= STALL_WARNING and not self.invoke.blocking:
                self._warn_stall(held, tag)
        if result is not None and isinstance(result, Deferred):  # None: the common, fast case
            if not result.called:
                # One sweep a second checks the deadlines: cheaper than a timer per message.
                delivery.deadline = self.clock.seconds() + self.settings.handler_timeout
                if self._sweeper is None:
                    self._start_sweeping()
            delivery.result = result
            result.addCallbacks(
                self._succeeded, self._failed, callbackArgs=(delivery,), errbackArgs=(delivery,)
            )
        else:
            self._succeeded(result, delivery)

    def _warn_stall(self, held: float, tag: int) -> None:
        log.warn(
            "Handler {handler} blocked the reactor for {held:.1f}s on message {tag}: heartbeats "
            "and all other messages waited (after two missed heartbeats, {limit}s here, the broker "
            "drops the connection); return a Deferred or a coroutine, or mark it @consumer_svc.blocking",
            handler=self.invoke.name,
            held=held,
            tag=tag,
            limit=2 * self.settings.heartbeat,
            stall_seconds=held,
        )

    def _start_sweeping(self) -> None:
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(min(1.0, self.settings.handler_timeout / 4), now=False)

    def _stop_sweeping(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None

    def _sweep(self) -> None:
        """Cancel handlers past --handler-timeout; stop sweeping once none is pending."""
        now, pending = self.clock.seconds(), False
        for delivery in list(self.inflight):
            result = delivery.result
            if delivery.phase is not Phase.HANDLING or result is None or result.called:
                continue
            if delivery.deadline <= now and not delivery.abandoned:
                delivery.timed_out = True
                # Our errback sees the CancelledError and treats it as a failure.
                result.cancel()
            else:
                pending = True
        if not pending:
            self._stop_sweeping()

    def _succeeded(self, _result: object, delivery: Delivery) -> None:
        if delivery.abandoned:
            return
        self.on_handled(self.monotonic() - delivery.started)
        _stop_timer(delivery)
        publishes = delivery.message._publishes
        if not publishes:
            self._settle(delivery, Outcome.ACKED)
            return
        # "Consume, then publish" is at-least-once: ack only once every publish is confirmed.
        delivery.phase = Phase.PUBLISHING
        _account_for(publishes)
        settled = [d for _, d in publishes]
        gatherResults(settled, consumeErrors=True).addCallbacks(
            lambda _: self._settle(delivery, Outcome.ACKED),
            lambda failure: self._failed(failure.value.subFailure, delivery),
        )

    def _failed(self, failure: Failure, delivery: Delivery) -> None:
        if delivery.abandoned:
            return
        if delivery.phase is Phase.HANDLING:
            self.on_handled(self.monotonic() - delivery.started)
        _stop_timer(delivery)
        message = delivery.message
        if message._publishes:
            _account_for(message._publishes)
            for _, settled in message._publishes:
                settled.addErrback(lambda _: None)
        retries = retries_of(message.headers)
        timeout = self.settings.handler_timeout if delivery.timed_out else None
        error = failure.value
        assert error is not None
        reason = describe_failure(error, timeout=timeout)
        decision = self.policy.decide(error, retries, reason)
        fields: dict[str, Any] = {
            "handler": self.invoke.name,
            "tag": message.delivery_tag,
            "reason": reason,
            "attempt": retries + 1,
            "delay": decision.delay,
            "retries": self.settings.max_retries,
            "queue": self.settings.dead_letter_queue,
        }
        if decision.action is Action.RETRY:
            text = "Handler {handler} failed on message {tag} (attempt {attempt}): {reason}; retrying in {delay:g}s"
        else:
            text = "Handler {handler} failed on message {tag} (attempt {attempt}): {reason}; dead-lettering it to {queue}"
        if failure.check(Reject, Retry) or delivery.timed_out:
            log.warn(text, **fields)
        else:
            log.failure(text, failure, **fields)
        self._park(delivery, decision, retries)

    def _park(self, delivery: Delivery, decision: Decision, retries: int) -> None:
        """Publish a confirmed copy to a retry queue or the dead-letter queue, then ack."""
        delivery.phase = Phase.PUBLISHING
        message = delivery.message
        s = self.settings
        properties = copy.copy(message.properties)
        properties.expiration = None  # a per-message TTL would expire the parked copy
        if decision.action is Action.RETRY:
            target, arguments = retry_queue(s.queue, decision.delay)
            properties.headers = retry_headers(message.headers, retries + 1)
            outcome = Outcome.RETRIED
        else:
            target, arguments = s.dead_letter_queue, {}
            properties.headers = dead_letter_headers(
                message.headers,
                reason=decision.reason,
                attempts=retries + 1,
                exchange=message.exchange,
                routing_key=message.routing_key,
                queue=s.queue,
            )
            outcome = Outcome.DEAD_LETTERED
        channel = self.publisher.channel
        declared = (
            self._declare_queue(channel, target, arguments)
            if channel is not None and channel.is_open
            else succeed(None)
        )
        declared.addCallback(
            lambda _: self.publisher.publish("", target, message.body, properties, mandatory=True)
        )
        declared.addCallbacks(
            lambda _: self._settle(delivery, outcome),
            self._park_failed,
            errbackArgs=(delivery, decision),
        )

    def _park_failed(self, failure: Failure, delivery: Delivery, decision: Decision) -> None:
        if delivery.abandoned:
            return
        log.warn(
            "Could not {action} message {tag}: {reason}; handing it back to the broker in {delay:g}s",
            action=decision.action.value,
            tag=delivery.message.delivery_tag,
            reason=failure.getErrorMessage(),
            delay=HAND_BACK_PAUSE,
        )
        if self.state is ConsumerState.DRAINING:
            self._settle(delivery, Outcome.REJECTED)
            return
        # Held back briefly so that a failure that keeps happening never spins hot.
        delivery.phase = Phase.HOLDING
        delivery.timer = self.clock.callLater(
            HAND_BACK_PAUSE, self._settle, delivery, Outcome.REJECTED
        )

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        if delivery.phase is Phase.SETTLED:
            return
        delivery.phase = Phase.SETTLED
        delivery.timer = None
        self.inflight.discard(delivery)
        acks = delivery.acks
        tag = delivery.message.delivery_tag
        if acks is self.acks and acks.channel.is_open:
            if outcome is Outcome.REQUEUED:
                acks.nack(tag)
            elif outcome is Outcome.REJECTED:
                acks.reject(tag)
            else:
                acks.ack(tag)
        else:
            log.debug(
                "Message {tag} was not {outcome}: its channel is gone, the broker redelivers it",
                tag=tag,
                outcome=outcome.value,
            )
        self.on_outcome(outcome)
        if self._drained is not None and not self.inflight:
            self._finish_drain()

    # -- stopping

    def drain(self, timeout: float) -> Deferred[None]:
        """Stop taking messages and wait up to ``timeout`` s for in-flight ones.

        Those still running at the deadline are handed back to the broker and
        their handlers' results ignored. Fires when nothing is in flight.
        """
        self.state = ConsumerState.DRAINING
        if self.channel is not None and self.consumer_tag is not None:
            self.channel.cancel(self.consumer_tag).addErrback(lambda _: None)
            self.consumer_tag = None
        for delivery in list(self.inflight):
            if delivery.phase is Phase.HOLDING:
                _stop_timer(delivery)
                self._settle(delivery, Outcome.REJECTED)
        if not self.inflight:
            self.flush()
            self._stop_sweeping()
            self.state = ConsumerState.STOPPED
            return succeed(None)
        self._drained = Deferred()
        self._deadline = self.clock.callLater(timeout, self._give_up)
        return self._drained

    def _give_up(self) -> None:
        self._deadline = None
        log.warn(
            "Shutdown deadline reached with {count} message(s) in flight; handing them back",
            count=len(self.inflight),
        )
        for delivery in list(self.inflight):
            delivery.abandoned = True
            self.abandoned += 1
            _stop_timer(delivery)
            if delivery.phase is Phase.HANDLING and delivery.result is not None:
                try:
                    # Our own errback sees the CancelledError and ignores it.
                    delivery.result.cancel()
                except Exception:
                    log.failure("Cancelling handler {handler} failed", handler=self.invoke.name)
            self._settle(delivery, Outcome.REQUEUED)

    def flush(self) -> None:
        """Send the acks that wait for the end of this reactor turn, now."""
        if self.acks is not None:
            self.acks.flush()

    def _finish_drain(self) -> None:
        self.flush()
        self._stop_sweeping()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        drained, self._drained = self._drained, None
        self.state = ConsumerState.STOPPED
        if drained is not None:
            drained.callback(None)


def _account_for(publishes: list[tuple[Deferred[None], Deferred[None]]]) -> None:
    """A failed publish fails the message, which is logged; the handler need not wait for it."""
    for confirmed, _ in publishes:
        confirmed.addErrback(lambda _: None)


def _stop_timer(delivery: Delivery) -> None:
    if delivery.timer is not None and delivery.timer.active():
        delivery.timer.cancel()
    delivery.timer = None


def _reason(reason: BaseException) -> str:
    if isinstance(reason, pika_errors.ChannelClosed):
        return f"{reason.reply_code} {reason.reply_text}"
    return f"{type(reason).__name__}: {reason}"
