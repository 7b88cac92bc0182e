"""The consumer: sets up the channels, hands deliveries to the handler, settles each one.

A message is acked only after its handler succeeded (and every publish the
handler made was confirmed), or after a confirmed copy of it was parked in a
retry queue or the dead-letter queue. Acks go only to the channel the message
came from: a delivery whose channel died is left for the broker to redeliver,
even if its handler later succeeds.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pika import exceptions as pika_errors
from pika.spec import BasicProperties
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ._acks import Acks
from ._channel import Channel
from ._codec import UndecodableHeaders, encodable
from ._connection import AMQPConnection
from ._copies import copy_properties, note_stripped, safe_headers
from ._errors import (
    FatalError,
    Pause,
    PublishRefused,
    Reject,
    Retry,
)
from ._handler import Invoker
from ._message import Message
from ._outcome import Outcome
from ._publisher import Publisher
from ._retry import (
    Action,
    Decision,
    RetryPolicy,
    dead_letter_arguments,
    dead_letter_headers,
    describe_failure,
    retries_of,
    retry_headers,
    retry_queue,
)
from ._settings import Settings
from ._states import CONNECTED, ENDING, TAKING, Event, Facts, Machine, State, Transition
from ._states import Action as Do
from ._topology import FailureQueues, declare_work_queue, failure_targets, setup_error

if TYPE_CHECKING:
    from ._tracing import Trace, Tracing

log = Logger(namespace="consumer_svc.consumer")

#: A non-blocking handler that holds the reactor this long (seconds) is warned about.
STALL_WARNING = 1.0
#: Seconds a message is held before it is handed back when it could not be parked.
HAND_BACK_PAUSE = 1.0


class Phase(enum.Enum):
    """Where one message is between its arrival and its settlement."""

    WAITING = "waiting"  # delivered, waiting for a free handler slot (--concurrency)
    HANDLING = "handling"  # the handler runs
    PUBLISHING = "publishing"  # waiting for confirms: the handler's publishes, or its parked copy
    HOLDING = "holding"  # could not be parked: held briefly, then handed back
    SETTLED = "settled"


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
    #: Why the broker refused its copy when published on its own: park it bare.
    refused: str | None = None
    #: It holds one of the --concurrency slots.
    running: bool = False
    #: The one message taken while paused, to see whether the downstream is back.
    probe: bool = False
    #: Its span, while tracing is on.
    trace: Trace | None = None


@dataclass
class Paused:
    """Why and since when the consumer takes no messages, and when it tries one again."""

    cause: str
    #: Paused by the operator: no probes, until resumed.
    by_operator: bool = False
    #: The wait before the next probe, in seconds.
    delay: float = 0.0
    timer: IDelayedCall | None = None


class _Unavailable(Exception):
    """The queue a failed message should go to cannot be declared or found now."""


_OUTCOMES = {Action.RETRY: Outcome.RETRIED, Action.DEAD_LETTER: Outcome.DEAD_LETTERED}


@dataclass
class Consumer:
    """Consumes one queue through whichever channel is current.

    Where it is lives in ``machine``, shared with the service: the consumer
    tells it what happens to the subscription (set up, lost, paused, probing,
    resumed) and performs the actions the table gives it.
    """

    settings: Settings
    invoke: Invoker
    clock: IReactorTime
    machine: Machine = field(default_factory=Machine)
    #: Real elapsed time, to catch handlers that hold the reactor.
    monotonic: Callable[[], float] = time.monotonic
    #: Called with each settled message's outcome (metrics).
    on_outcome: Callable[[Outcome], None] = lambda outcome: None
    #: Called with how long each handler took, in seconds (metrics).
    on_handled: Callable[[float], None] = lambda seconds: None
    #: Spans for deliveries and publishes; None (the default) is tracing off.
    tracing: Tracing | None = None
    channel: Channel | None = None
    #: The current channel's acks; a delivery from an older channel holds an older one.
    acks: Acks | None = None
    consumer_tag: str | None = None
    #: Consuming channels opened so far: log lines name a message by tag *and* channel.
    channels_opened: int = 0
    inflight: set[Delivery] = field(default_factory=set)
    #: Deliveries handed back at the shutdown deadline while their handler ran on.
    abandoned: int = 0
    publisher: Publisher = field(init=False)
    policy: RetryPolicy = field(init=False)
    failure_queues: FailureQueues = field(init=False)
    connection: AMQPConnection | None = None
    #: Deliveries whose copy the broker refused, to be published again one at a time.
    _suspects: deque[tuple[Delivery, Decision, int]] = field(default_factory=deque)
    _isolating: bool = False
    #: Delivered, waiting for one of the --concurrency slots, in order.
    _waiting: deque[Delivery] = field(default_factory=deque)
    _running: int = 0
    _starting: bool = False
    #: Failures in a row (Reject aside): enough of them pause the consumer.
    _failures_in_row: int = 0
    paused: Paused | None = None
    #: The wait before the first probe of the next pause; doubles while probes fail.
    _pause_delay: float = 0.0
    #: The clock's time of the last delivery, for the stall check.
    last_delivery: float = 0.0
    _stall_check: LoopingCall | None = None
    _drained: Deferred[None] | None = None
    _deadline: IDelayedCall | None = None
    _sweeper: LoopingCall | None = None

    def __post_init__(self) -> None:
        self.last_delivery = self.clock.seconds()
        self.publisher = Publisher(self.clock, self.settings.publish_timeout)
        self.policy = RetryPolicy(self.settings.max_retries, self.settings.retry_delay)
        self.failure_queues = FailureQueues(self.clock, self.settings.declare, self._fatal)
        for action, performer in (
            (Do.ATTACH, self._attach),
            (Do.HOLD, self._hold),
            (Do.TRY_ONE, self._try_one),
            (Do.SUBSCRIBE, self._resubscribe),
        ):
            self.machine.perform(action, performer)

    @property
    def state(self) -> State:
        """Where the service and this consumer are (the machine's state)."""
        return self.machine.state

    def _fatal(self, error: FatalError) -> None:
        self.machine.fire(Event.FAIL, Facts(error=error))

    def _lost(self, reason: str) -> None:
        """The subscription is gone while the connection stays up: the service starts afresh."""
        self.machine.fire(Event.SUBSCRIPTION_LOST, Facts(reason=reason))

    # -- setting up

    def _attach(self, transition: Transition) -> None:
        """Set up on the connection just opened; tell the machine how it went."""
        connection: AMQPConnection = transition.facts.connection

        def failed(failure: Failure) -> None:
            if connection.lost or connection is not self.connection:
                return  # the connection's loss tells the story
            if failure.check(FatalError):
                self._fatal(failure.value)  # type: ignore[arg-type]
            else:
                self.machine.fire(Event.SETUP_FAILED, Facts(connection=connection, failure=failure))

        self.attach(connection).addErrback(failed)

    @inlineCallbacks
    def attach(self, connection: AMQPConnection) -> Any:
        """Open the channels, declare the work queue, set QoS and subscribe.

        Fails with a `FatalError` for what retrying cannot fix (permissions,
        mismatched arguments) and with `SetupFailed` otherwise. The retry and
        dead-letter queues are declared afterwards, apart: none of them can
        keep the service from consuming. Ends with SET_UP (or SET_UP_PAUSED).
        """
        self.connection = connection
        self.failure_queues.attach(connection)
        try:
            yield self._open_publisher(connection)
            channel: Channel = yield connection.open_channel()
            self.channel = channel
            self.channels_opened += 1
            self.acks = Acks(channel)
            channel.closed.addCallback(self._channel_closed, channel, "channel")
            channel.on_cancelled = self._cancelled_by_broker
            yield declare_work_queue(channel, self.settings)
            if self.paused is None:
                yield channel.qos(self.settings.prefetch)
                self.consumer_tag = yield channel.consume(self.settings.queue, self._on_message)
        except pika_errors.ChannelClosedByBroker as e:
            raise setup_error(e, self.settings) from None
        if self.connection is connection and self.state is State.SETTING_UP:
            self.last_delivery = self.clock.seconds()
            self.failure_queues.check(failure_targets(self.settings, self.policy))
            self._start_stall_check()
            if self.paused is None:
                self.machine.fire(Event.SET_UP)
            else:
                self.machine.fire(Event.SET_UP_PAUSED, Facts(reason=self.paused.cause))

    @inlineCallbacks
    def _open_publisher(self, connection: AMQPConnection) -> Any:
        publishing: Channel = yield connection.open_channel()
        publishing.closed.addCallback(self._channel_closed, publishing, "publisher channel")
        yield publishing.confirm()
        self.publisher.channel = publishing

    def _channel_closed(self, reason: BaseException, channel: Channel, which: str) -> None:
        if channel is self.publisher.channel:
            self.publisher.channel = None
            if self.state in CONNECTED and isinstance(reason, pika_errors.ChannelClosedByBroker):
                # A refused publish closes only this channel: open another, keep consuming.
                log.warn(
                    "The broker closed the publishing channel: {reason}; opening another",
                    reason=_reason(reason),
                )
                self._reopen_publisher()
            return
        if channel is self.channel:
            self.channel = None
            self.acks = None
            self.consumer_tag = None
        else:
            return
        # Only a channel-level close is ours to report: when the whole
        # connection goes, the connection's own loss tells the story.
        if isinstance(reason, pika_errors.ChannelClosedByBroker):
            self._lost(f"{which} closed by the broker: {_reason(reason)}")

    def _reopen_publisher(self) -> None:
        connection = self.connection
        if connection is None or connection.lost:
            return

        def failed(failure: Failure) -> None:
            if self.connection is connection and not connection.lost:
                self._lost(f"could not open a publishing channel: {failure.getErrorMessage()}")

        self._open_publisher(connection).addCallbacks(lambda _: self._next_suspect(), failed)

    def _cancelled_by_broker(self) -> None:
        """The broker cancelled us (queue deleted, leader moved): start afresh."""
        self.consumer_tag = None
        self._lost(f"the broker cancelled the consumer of queue {self.settings.queue!r}")

    def detach(self) -> None:
        """The connection is gone: deliveries in flight can no longer be settled."""
        self.channel = None
        self.acks = None
        self.publisher.channel = None
        self.consumer_tag = None
        self.connection = None
        self._stop_stall_check()
        self.failure_queues.detach()
        suspects, self._suspects = self._suspects, deque()
        self._isolating = False
        for delivery, _, _ in suspects:
            self._settle(delivery, Outcome.REJECTED)  # not sent: the broker redelivers it
        waiting, self._waiting = self._waiting, deque()
        for delivery in waiting:
            self._settle(delivery, Outcome.REQUEUED)  # likewise

    # -- the per-message path

    def _on_message(self, channel: Channel, method: Any, properties: Any, body: bytes) -> None:
        tag = method.delivery_tag
        acks = self.acks
        if acks is None or acks.channel is not channel:
            return  # a straggler from a channel we gave up on: the broker redelivers it
        acks.delivered(tag)
        state = self.machine.state
        # `is` first: the common case costs no hash (an Enum's __hash__ is Python code).
        if state is not State.CONSUMING and state not in TAKING:
            # Delivered between our cancel and the broker's cancel-ok: hand it back.
            acks.nack(tag)
            return
        self.last_delivery = self.clock.seconds()
        message = Message(
            body,
            properties,
            delivery_tag=tag,
            routing_key=method.routing_key,
            exchange=method.exchange,
            redelivered=method.redelivered,
        )
        message._publisher = self.publisher
        message._reply_to_allow = self.settings.reply_to_allow
        message._channel = self.channels_opened
        delivery = Delivery(acks, message)
        self.inflight.add(delivery)
        if self.tracing is not None:
            delivery.trace = message._trace = self.tracing.delivered(self.settings.queue, message)
        if type(properties.headers) is UndecodableHeaders:
            self._undecodable(delivery, properties.headers)
            return
        if state is State.PROBING:
            if any(d.probe for d in self.inflight):
                self._settle(delivery, Outcome.REQUEUED)  # one probe at a time
                return
            delivery.probe = True
        if self._running >= self.settings.concurrency:
            delivery.phase = Phase.WAITING
            self._waiting.append(delivery)
            return
        self._run(delivery)

    def _run(self, delivery: Delivery) -> None:
        """Run the handler on one message; it holds a --concurrency slot until it is done."""
        delivery.phase = Phase.HANDLING
        delivery.running = True
        self._running += 1
        message = delivery.message
        delivery.started = started = self.monotonic()
        try:
            trace = delivery.trace
            result = self.invoke(message) if trace is None else trace.run(self.invoke, message)
        except Exception:
            self._failed(Failure(), delivery)
            return
        finally:
            held = self.monotonic() - started
            if held >= STALL_WARNING and not self.invoke.blocking:
                self._warn_stall(held, message)
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

    def _undecodable(self, delivery: Delivery, headers: UndecodableHeaders) -> None:
        """Headers we could not read: park the message without running the handler on it."""
        reason = f"UndecodableHeaders: {headers.error}"
        if delivery.trace is not None:
            delivery.trace.failed("UndecodableHeaders", reason)
        log.warn(
            "The headers of {message_name} cannot be decoded ({reason}); parking it in {queue} "
            "without running the handler",
            **_names(delivery.message),
            reason=headers.error,
            queue=self.settings.dead_letter_queue,
        )
        self._park(delivery, Decision(Action.DEAD_LETTER, reason), 0)

    def _warn_stall(self, held: float, message: Message) -> None:
        log.warn(
            "Handler {handler} blocked the reactor for {held:.1f}s on {message_name}: heartbeats "
            "and all other messages waited (after two missed heartbeats, {limit}s here, the broker "
            "drops the connection); return a Deferred or a coroutine, or mark it @consumer_svc.blocking",
            handler=self.invoke.name,
            held=held,
            **_names(message),
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
        if delivery.phase is Phase.HANDLING:
            self.on_handled(self.monotonic() - delivery.started)
            self._release(delivery)
        _stop_timer(delivery)
        self._failures_in_row = 0
        if delivery.probe and self.paused is not None and not self.paused.by_operator:
            self.resume()
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
            self._release(delivery)
        _stop_timer(delivery)
        message = delivery.message
        if message._publishes:
            _account_for(message._publishes)
            for _, settled in message._publishes:
                settled.addErrback(lambda _: None)
        if self._not_an_attempt(failure, delivery):
            return
        retries = retries_of(message.headers)
        timeout = self.settings.handler_timeout if delivery.timed_out else None
        error = failure.value
        assert error is not None
        reason = describe_failure(error, timeout=timeout)
        decision = self.policy.decide(error, retries, reason)
        if delivery.trace is not None:
            delivery.trace.failed("timeout" if delivery.timed_out else error, reason)
        fields: dict[str, Any] = {
            "handler": self.invoke.name,
            **_names(message),
            "reason": reason,
            "attempt": retries + 1,
            "delay": decision.delay,
            "retries": self.settings.max_retries,
            "queue": self.settings.dead_letter_queue,
        }
        if decision.action is Action.RETRY:
            text = "Handler {handler} failed on {message_name} (attempt {attempt}): {reason}; retrying in {delay:g}s"
        else:
            text = "Handler {handler} failed on {message_name} (attempt {attempt}): {reason}; dead-lettering it to {queue}"
        if failure.check(Reject, Retry) or delivery.timed_out:
            log.warn(text, **fields)
        else:
            # Expected in a service's life, so a warning; the traceback shows where.
            log.failure(text, failure, level=LogLevel.warn, **fields)
        self._park(delivery, decision, retries)

    def _not_an_attempt(self, failure: Failure, delivery: Delivery) -> bool:
        """Pause, or hand the message back unharmed, when the failure is the downstream's.

        True when the message was handed back: a failure while paused or
        during a probe, and `Pause` itself, is no attempt of the message's.
        """
        error = failure.value
        if isinstance(error, Pause) or self.paused is not None or delivery.probe:
            reason = describe_failure(error) if error is not None else "?"
            if isinstance(error, Pause):
                self.pause(reason, delay=error.delay)
            elif delivery.probe:
                self._probe_failed(reason)
            log.info(
                "Handing {message_name} back unharmed (paused): {reason}",
                **_names(delivery.message),
                reason=reason,
            )
            self._settle(delivery, Outcome.REQUEUED)
            return True
        if not isinstance(error, Reject):
            self._failures_in_row += 1
            limit = self.settings.pause_after
            if limit and self._failures_in_row >= limit and error is not None:
                # This failure still counts (it is retried as usual); the next ones wait.
                self.pause(
                    f"{self._failures_in_row} failures in a row, the last: {describe_failure(error)}"
                )
        return False

    # -- pausing: a downstream is down

    def pause(self, cause: str, *, delay: float | None = None, by_operator: bool = False) -> None:
        """Take no new messages; those in flight finish; try one again after a backoff.

        Paused by the operator, no message is tried until `resume`; the
        operator may take over a pause that is on already.
        """
        paused = self.paused
        if paused is not None:
            if by_operator and not paused.by_operator:
                paused.by_operator = True
                paused.cause = cause
                self.machine.fire(Event.PAUSE, Facts(reason=cause, by_operator=True, again=True))
            return
        s = self.settings
        if delay is None:
            delay = self._pause_delay or min(s.pause_max, max(1.0, s.retry_delay))
        self._pause_delay = min(s.pause_max, delay * 2)
        self.paused = Paused(cause, by_operator=by_operator, delay=delay)
        self.machine.fire(Event.PAUSE, Facts(reason=cause, delay=delay, by_operator=by_operator))

    def resume(self) -> None:
        """Take messages at full speed again (after a probe succeeded, or by the operator)."""
        paused, self.paused = self.paused, None
        if paused is None:
            return
        _cancel(paused.timer)
        self._pause_delay = 0.0
        self._failures_in_row = 0
        self.machine.fire(Event.RESUME, Facts(reason=paused.cause, by_operator=paused.by_operator))

    def _hold(self, transition: Transition) -> None:
        """Paused (or still paused): no subscription, nothing waiting, and the next probe timed."""
        self._unsubscribe()
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            self._settle(waiter, Outcome.REQUEUED)
        paused = self.paused
        if paused is None:
            return
        _cancel(paused.timer)
        paused.timer = None
        if not paused.by_operator:
            paused.timer = self.clock.callLater(paused.delay, self._probe)

    def _probe(self) -> None:
        """The pause's backoff is over: try one message."""
        paused = self.paused
        if paused is not None:
            paused.timer = None
            self.machine.fire(Event.PROBE, Facts(reason=paused.cause))

    def _try_one(self, transition: Transition) -> None:
        """Subscribe for one message: whether it succeeds says whether the downstream is back."""
        self._subscribe(1)

    def _resubscribe(self, transition: Transition) -> None:
        self._unsubscribe()
        self._subscribe(self.settings.prefetch)

    def _probe_failed(self, reason: str) -> None:
        paused = self.paused
        if paused is None:
            return
        paused.delay = self._pause_delay or paused.delay
        self._pause_delay = min(self.settings.pause_max, paused.delay * 2)
        self.machine.fire(Event.PROBE_FAILED, Facts(reason=reason, delay=paused.delay))

    def _subscribe(self, prefetch: int) -> None:
        channel = self.channel
        if channel is None or not channel.is_open or self.consumer_tag is not None:
            return

        def consume(_: object) -> Deferred[str]:
            return channel.consume(self.settings.queue, self._on_message)

        def subscribed(tag: str) -> None:
            if channel is self.channel:
                self.consumer_tag = tag
                self.last_delivery = self.clock.seconds()

        # Per-consumer QoS applies to consumers subscribed after it.
        d = channel.qos(prefetch).addCallback(consume)
        d.addCallbacks(subscribed, lambda failure: log.debug("Subscribing failed: {f}", f=failure))

    def _unsubscribe(self) -> None:
        if self.channel is not None and self.consumer_tag is not None:
            self.channel.cancel(self.consumer_tag).addErrback(lambda _: None)
        self.consumer_tag = None

    # -- connected but consuming nothing

    def _start_stall_check(self) -> None:
        if self.settings.stall_check and self._stall_check is None:
            self._stall_check = LoopingCall(self._check_stall)
            self._stall_check.clock = self.clock
            self._stall_check.start(self.settings.stall_check, now=False)

    def _stop_stall_check(self) -> None:
        if self._stall_check is not None and self._stall_check.running:
            self._stall_check.stop()
        self._stall_check = None

    def _check_stall(self) -> None:
        """No delivery for a whole interval though we had room: does the queue hold ready messages?"""
        s = self.settings
        connection = self.connection
        if (
            connection is None
            or self.state is not State.CONSUMING
            or self.consumer_tag is None
            or len(self.inflight) >= min(s.concurrency, s.prefetch)
            or self.clock.seconds() - self.last_delivery < s.stall_check
        ):
            return

        def check(channel: Channel) -> Deferred[Any]:
            def close(result: object) -> object:
                channel.close()
                return result

            return channel.declare_queue(s.queue, passive=True, arguments={}).addBoth(close)

        def judge(frame: Any) -> None:
            ready = int(frame.method.message_count)
            idle = self.clock.seconds() - self.last_delivery
            if ready and idle >= s.stall_check and self.connection is connection:
                self._lost(
                    f"no delivery for {idle:.0f}s though queue {s.queue!r} holds {ready} ready "
                    f"message(s) and {len(self.inflight)} of ours are in flight (the broker no "
                    f"longer delivers to us: --stall-check)"
                )

        d = connection.open_channel().addCallback(check).addCallback(judge)
        d.addErrback(lambda failure: log.debug("Stall check failed: {f}", f=failure))

    # -- concurrency

    def _release(self, delivery: Delivery) -> None:
        """The handler is done: its slot goes to the next waiting message."""
        if not delivery.running:
            return
        delivery.running = False
        self._running -= 1
        if self._waiting and not self._starting:
            self._starting = True
            try:
                while self._waiting and self._running < self.settings.concurrency:
                    waiter = self._waiting.popleft()
                    if waiter.phase is Phase.WAITING:
                        self._run(waiter)
            finally:
                self._starting = False

    def _park(self, delivery: Delivery, decision: Decision, retries: int) -> None:
        """Publish a confirmed copy to a retry queue or the dead-letter queue, then ack."""
        delivery.phase = Phase.PUBLISHING
        target, arguments = self._target(decision)

        def publish(available: bool) -> Deferred[None]:
            if not available:
                problem = self.failure_queues.problem(target) or "not connected"
                raise _Unavailable(f"queue {target!r} is not available: {problem}")
            body, properties = self._copy(delivery, decision, retries)
            return self.publisher.publish(
                "", target, body, properties, mandatory=True, trace=delivery.trace
            )

        d = self.failure_queues.ensure(target, arguments).addCallback(publish)
        d.addCallbacks(
            lambda _: self._settle(delivery, _OUTCOMES[decision.action]),
            self._park_failed,
            errbackArgs=(delivery, decision, retries),
        )

    def _target(self, decision: Decision) -> tuple[str, dict[str, Any]]:
        """The queue a decision sends the copy to, and that queue's arguments."""
        s = self.settings
        if decision.action is Action.RETRY:
            return retry_queue(s.queue, decision.delay)
        return s.dead_letter_queue, dead_letter_arguments(s.queue_arguments)

    def _copy(
        self, delivery: Delivery, decision: Decision, retries: int
    ) -> tuple[bytes, BasicProperties]:
        """The copy to park: the original, less what a copy may not carry (named in a header)."""
        message = delivery.message
        if delivery.refused is not None:
            # Refused once on its own: park the body bare, with why.
            headers: dict[Any, Any] = {}
            stripped = ["every original header and property"]
            reason = f"{decision.reason}; then the broker refused its copy: {delivery.refused}"
            original = BasicProperties(
                content_type=message.properties.content_type,
                content_encoding=message.properties.content_encoding,
            )
        else:
            headers, stripped = safe_headers(message.headers)
            reason = decision.reason
            original = message.properties
        if decision.action is Action.RETRY and delivery.refused is None:
            headers = retry_headers(headers, retries + 1)
        else:
            headers = dead_letter_headers(
                headers,
                reason=reason,
                attempts=retries + 1,
                exchange=message.exchange,
                routing_key=message.routing_key,
                queue=self.settings.queue,
            )
        headers, unencodable = encodable(headers)
        properties, more = copy_properties(original, headers, username=self.settings.url.username)
        properties.headers = note_stripped(properties.headers or {}, stripped + unencodable + more)
        return message.body, properties

    def _park_failed(
        self, failure: Failure, delivery: Delivery, decision: Decision, retries: int
    ) -> None:
        if delivery.abandoned or delivery.phase is Phase.SETTLED:
            return
        if failure.check(PublishRefused) and self.state in CONNECTED:
            # The broker closed the channel over a publish: this copy, or another one
            # in flight with it. Published again one at a time, the guilty one shows.
            log.warn(
                "The broker refused the copy of {message_name} (or one published with it): "
                "{reason}; publishing it again on its own",
                **_names(delivery.message),
                reason=failure.getErrorMessage(),
            )
            self._suspects.append((delivery, decision, retries))
            if not self._isolating:
                self._next_suspect()
            return
        self._hand_back(delivery, decision, failure.getErrorMessage())

    def _hand_back(self, delivery: Delivery, decision: Decision, reason: str) -> None:
        log.warn(
            "Could not {action} {message_name}: {reason}; handing it back to the broker in {delay:g}s",
            action=decision.action.value,
            **_names(delivery.message),
            reason=reason,
            delay=HAND_BACK_PAUSE,
        )
        if self.state in ENDING:
            self._settle(delivery, Outcome.REJECTED)
            return
        # Held back briefly so that a failure that keeps happening never spins hot.
        delivery.phase = Phase.HOLDING
        delivery.timer = self.clock.callLater(
            HAND_BACK_PAUSE, self._settle, delivery, Outcome.REJECTED
        )

    def _next_suspect(self) -> None:
        """Publish the next refused copy on its own: refused again, it is the guilty one."""
        while self._suspects and self._suspects[0][0].phase is Phase.SETTLED:
            self._suspects.popleft()
        if not self._suspects or self.state not in CONNECTED:
            self._isolating = False
            return
        channel = self.publisher.channel
        if channel is None or not channel.is_open:
            self._isolating = True  # waits for the publishing channel to reopen
            return
        self._isolating = True
        delivery, decision, retries = self._suspects.popleft()
        if delivery.refused is not None:
            decision = Decision(Action.DEAD_LETTER, decision.reason)
        target, _ = self._target(decision)
        body, properties = self._copy(delivery, decision, retries)
        d = self.publisher.publish(
            "", target, body, properties, mandatory=True, trace=delivery.trace
        )

        def done(_: object) -> None:
            self._settle(delivery, _OUTCOMES[decision.action])
            self._next_suspect()

        def failed(failure: Failure) -> None:
            if failure.check(PublishRefused) and delivery.refused is None:
                delivery.refused = failure.getErrorMessage()
                log.warn(
                    "The broker refused the copy of {message_name} on its own too: {reason}; "
                    "parking its body in {queue} without its headers and properties",
                    **_names(delivery.message),
                    reason=delivery.refused,
                    queue=self.settings.dead_letter_queue,
                )
                self._suspects.appendleft((delivery, decision, retries))
                # Goes on now if the publishing channel is open again, else once it is.
                self._next_suspect()
                return
            self._hand_back(delivery, decision, failure.getErrorMessage())
            self._next_suspect()

        d.addCallbacks(done, failed)

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        if delivery.phase is Phase.SETTLED:
            return
        self._release(delivery)
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
                "{message_name} was not {outcome}: its channel is gone, the broker redelivers it",
                **_names(delivery.message),
                outcome=outcome.value,
            )
        self.on_outcome(outcome)
        if delivery.trace is not None:
            delivery.trace.settled(outcome.value)
        if self._drained is not None and not self.inflight:
            self._finish_drain()

    # -- stopping

    def drain(self, timeout: float) -> Deferred[None]:
        """Stop taking messages and wait up to ``timeout`` s for in-flight ones.

        Those still running at the deadline are handed back to the broker and
        their handlers' results ignored. Fires when nothing is in flight. The
        consumer's part of a stop: the machine is stopping already, so
        nothing new is taken.
        """
        self._stop_stall_check()
        self._unsubscribe()
        if self.paused is not None:
            _cancel(self.paused.timer)
        waiting, self._waiting = self._waiting, deque()
        for delivery in waiting:
            self._settle(delivery, Outcome.REQUEUED)  # never started: nothing to finish
        suspects, self._suspects = self._suspects, deque()
        self._isolating = False
        for delivery, _, _ in suspects:
            self._settle(delivery, Outcome.REJECTED)
        for delivery in list(self.inflight):
            if delivery.phase is Phase.HOLDING:
                _stop_timer(delivery)
                self._settle(delivery, Outcome.REJECTED)
        if not self.inflight:
            self.flush()
            self._stop_sweeping()
            return succeed(None)
        self._drained = Deferred()
        self._deadline = self.clock.callLater(timeout, self._give_up)
        return self._drained

    def hurry(self) -> None:
        """Reach the shutdown deadline now (a second signal): hand back what is in flight."""
        if self._drained is None:
            return
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._give_up(now=True)

    def _give_up(self, now: bool = False) -> None:
        self._deadline = None
        log.warn(
            "{when} with {count} message(s) in flight; handing them back",
            when="Stopping at once" if now else "Shutdown deadline reached",
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
        if drained is not None:
            drained.callback(None)


def _account_for(publishes: list[tuple[Deferred[None], Deferred[None]]]) -> None:
    """A failed publish fails the message, which is logged; the handler need not wait for it."""
    for confirmed, _ in publishes:
        confirmed.addErrback(lambda _: None)


def _names(message: Message) -> dict[str, Any]:
    """The log fields that name a message: its stable name, and the facts it is made of."""
    return {
        "message_name": message.name,
        "message_id": message.properties.message_id,
        "channel": message._channel,
        "tag": message.delivery_tag,
    }


def _cancel(timer: IDelayedCall | None) -> None:
    if timer is not None and timer.active():
        timer.cancel()


def _stop_timer(delivery: Delivery) -> None:
    if delivery.timer is not None and delivery.timer.active():
        delivery.timer.cancel()
    delivery.timer = None


def _reason(reason: BaseException) -> str:
    if isinstance(reason, pika_errors.ChannelClosed):
        return f"{reason.reply_code} {reason.reply_text}"
    return f"{type(reason).__name__}: {reason}"
