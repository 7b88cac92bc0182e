"""The consumer: sets up a channel, hands deliveries to the handler, settles each one.

A message is acked only after its handler succeeded, and only on the channel
it came from: a delivery whose channel died is left for the broker to
redeliver, even if its handler later succeeds.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pika import exceptions as pika_errors
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._amqp import AMQPConnection, Channel
from ._errors import AccessRefused, Reject, TopologyMismatch
from ._handler import Invoker
from ._message import Message
from ._settings import Settings

log = Logger(namespace="consumer_svc.consumer")

#: A non-blocking handler that holds the reactor this long (seconds) is warned about.
STALL_WARNING = 1.0


class ConsumerState(enum.Enum):
    """Where the consumer is."""

    IDLE = "idle"  # no channel
    SETTING_UP = "setting up"  # channel opening, declaring, subscribing
    CONSUMING = "consuming"
    DRAINING = "draining"  # stopping: no new messages, waiting for in-flight ones
    STOPPED = "stopped"


class Outcome(enum.Enum):
    """What happens to a message once its handler is done."""

    ACK = "acked"
    REJECT = "rejected"  # basic.reject, no requeue: dropped or dead-lettered by the broker
    REQUEUE = "requeued"  # basic.nack with requeue: delivered again


@dataclass(eq=False)
class Delivery:
    """One message between its arrival and its settlement."""

    channel: Channel
    message: Message
    result: Deferred[Any] | None = None
    #: The --handler-timeout, or the --requeue-delay once the handler failed.
    timer: IDelayedCall | None = None
    timed_out: bool = False
    #: Set at the shutdown deadline: whatever the handler does next is ignored.
    abandoned: bool = False


class SetupFailed(Exception):
    """Setting up the channel failed in a way that a reconnect may fix."""


@dataclass
class Consumer:
    """Consumes one queue through whichever channel is current."""

    settings: Settings
    invoke: Invoker
    clock: IReactorTime
    #: Called when the channel or the subscription is lost while the
    #: connection stays up; the owner recovers (reconnects).
    on_lost: Callable[[str], None]
    #: Real elapsed time, to catch handlers that hold the reactor.
    monotonic: Callable[[], float] = time.monotonic
    state: ConsumerState = ConsumerState.IDLE
    channel: Channel | None = None
    consumer_tag: str | None = None
    inflight: set[Delivery] = field(default_factory=set)
    #: Deliveries handed back at the shutdown deadline while their handler ran on.
    abandoned: int = 0
    _drained: Deferred[None] | None = None
    _deadline: IDelayedCall | None = None

    # -- setting up

    @inlineCallbacks
    def attach(self, connection: AMQPConnection) -> Any:
        """Open a channel, declare the topology, set QoS and subscribe.

        Fails with a `FatalError` for what retrying cannot fix (permissions,
        mismatched arguments) and with `SetupFailed` otherwise.
        """
        self.state = ConsumerState.SETTING_UP
        channel: Channel = yield connection.open_channel()
        self.channel = channel
        channel.closed.addCallback(self._channel_closed, channel)
        channel.on_cancelled = self._cancelled_by_broker
        try:
            yield self._declare(channel)
            yield channel.qos(self.settings.prefetch)
            self.consumer_tag = yield channel.consume(self.settings.queue, self._on_message)
        except pika_errors.ChannelClosedByBroker as e:
            raise self._setup_error(e) from None
        if self.state is ConsumerState.SETTING_UP:
            self.state = ConsumerState.CONSUMING

    def _declare(self, channel: Channel) -> Deferred[Any]:
        s = self.settings
        if not s.declare:
            return channel.declare_queue(s.queue, passive=True, arguments={})

        @inlineCallbacks
        def declare() -> Any:
            yield channel.declare_queue(s.queue, passive=False, arguments=s.queue_arguments)
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
                f"(configured: {dict(s.queue_arguments)!r}): {text}"
            )
        if e.reply_code == 404 and not s.declare:
            return SetupFailed(f"queue {s.queue!r} does not exist (--no-declare): {text}")
        return SetupFailed(text)

    def _channel_closed(self, reason: BaseException, channel: Channel) -> None:
        if channel is not self.channel:
            return
        self.channel = None
        self.consumer_tag = None
        # Only a channel-level close is ours to report: when the whole
        # connection goes, the connection's own loss tells the story.
        if self.state is ConsumerState.CONSUMING and isinstance(
            reason, pika_errors.ChannelClosedByBroker
        ):
            self.state = ConsumerState.IDLE
            self.on_lost(f"channel closed by the broker: {_reason(reason)}")

    def _cancelled_by_broker(self) -> None:
        """The broker cancelled us (queue deleted, leader moved): subscribe again."""
        if self.state is not ConsumerState.CONSUMING:
            return
        self.consumer_tag = None
        self.state = ConsumerState.IDLE
        self.on_lost(f"the broker cancelled the consumer of queue {self.settings.queue!r}")

    def detach(self) -> None:
        """The connection is gone: deliveries in flight can no longer be settled."""
        self.channel = None
        self.consumer_tag = None
        if self.state in (ConsumerState.SETTING_UP, ConsumerState.CONSUMING):
            self.state = ConsumerState.IDLE

    # -- the per-message path

    def _on_message(self, channel: Channel, method: Any, properties: Any, body: bytes) -> None:
        tag = method.delivery_tag
        if self.state in (ConsumerState.DRAINING, ConsumerState.STOPPED):
            # Delivered between our cancel and the broker's cancel-ok: hand it back.
            channel.nack(tag, requeue=True)
            return
        message = Message(
            body,
            properties,
            delivery_tag=tag,
            routing_key=method.routing_key,
            exchange=method.exchange,
            redelivered=method.redelivered,
        )
        delivery = Delivery(channel, message)
        self.inflight.add(delivery)
        started = self.monotonic()
        try:
            result = self.invoke(message)
        except Exception:
            self._failed(Failure(), delivery)
            return
        finally:
            held = self.monotonic() - started
            if held >= STALL_WARNING and not self.invoke.blocking:
                self._warn_stall(held, tag)
        if isinstance(result, Deferred):
            if not result.called:
                delivery.timer = self.clock.callLater(
                    self.settings.handler_timeout, self._timed_out, delivery
                )
            delivery.result = result
            result.addCallbacks(
                self._succeeded, self._failed, callbackArgs=(delivery,), errbackArgs=(delivery,)
            )
        else:
            self._settle(delivery, Outcome.ACK)

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

    def _timed_out(self, delivery: Delivery) -> None:
        delivery.timer = None
        delivery.timed_out = True
        assert delivery.result is not None
        # Our errback sees the CancelledError and treats it as a failure.
        delivery.result.cancel()

    def _succeeded(self, _result: object, delivery: Delivery) -> None:
        if not delivery.abandoned:
            self._stop_timer(delivery)
            self._settle(delivery, Outcome.ACK)

    def _failed(self, failure: Failure, delivery: Delivery) -> None:
        if delivery.abandoned:
            return
        self._stop_timer(delivery)
        tag = delivery.message.delivery_tag
        if delivery.timed_out:
            log.warn(
                "Handler {handler} timed out after {timeout:g}s on message {tag} and was "
                "cancelled (--handler-timeout); requeueing it in {delay:g}s",
                handler=self.invoke.name,
                timeout=self.settings.handler_timeout,
                tag=tag,
                delay=self.settings.requeue_delay,
            )
            self._requeue_later(delivery)
            return
        if failure.check(Reject):
            log.warn(
                "Handler {handler} rejected message {tag}: {reason}; not requeued",
                handler=self.invoke.name,
                tag=tag,
                reason=failure.getErrorMessage(),
            )
            self._settle(delivery, Outcome.REJECT)
            return
        log.failure(
            "Handler {handler} failed on message {tag}; requeueing it in {delay:g}s",
            failure,
            handler=self.invoke.name,
            tag=tag,
            delay=self.settings.requeue_delay,
        )
        self._requeue_later(delivery)

    def _requeue_later(self, delivery: Delivery) -> None:
        delay = self.settings.requeue_delay
        if self.state is ConsumerState.DRAINING or delay <= 0:
            self._settle(delivery, Outcome.REQUEUE)
        else:
            # Held back briefly so that a failing handler never spins hot.
            delivery.timer = self.clock.callLater(delay, self._settle, delivery, Outcome.REQUEUE)

    @staticmethod
    def _stop_timer(delivery: Delivery) -> None:
        if delivery.timer is not None and delivery.timer.active():
            delivery.timer.cancel()
        delivery.timer = None

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self.inflight.discard(delivery)
        delivery.timer = None
        channel = delivery.channel
        tag = delivery.message.delivery_tag
        if channel is self.channel and channel.is_open:
            if outcome is Outcome.ACK:
                channel.ack(tag)
            elif outcome is Outcome.REJECT:
                channel.reject(tag, requeue=False)
            else:
                channel.nack(tag, requeue=True)
        else:
            log.debug(
                "Message {tag} was not {outcome}: its channel is gone, the broker redelivers it",
                tag=tag,
                outcome=outcome.value,
            )
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
            if delivery.result is None or delivery.result.called:
                # Its handler is done and failed: it only waits out --requeue-delay.
                self._stop_timer(delivery)
                self._settle(delivery, Outcome.REQUEUE)
        if not self.inflight:
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
            self._stop_timer(delivery)
            if delivery.result is not None:
                try:
                    # Our own errback sees the CancelledError and ignores it.
                    delivery.result.cancel()
                except Exception:
                    log.failure("Cancelling handler {handler} failed", handler=self.invoke.name)
            self._settle(delivery, Outcome.REQUEUE)

    def _finish_drain(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        drained, self._drained = self._drained, None
        self.state = ConsumerState.STOPPED
        if drained is not None:
            drained.callback(None)


def _reason(reason: BaseException) -> str:
    if isinstance(reason, pika_errors.ChannelClosed):
        return f"{reason.reply_code} {reason.reply_text}"
    return f"{type(reason).__name__}: {reason}"
