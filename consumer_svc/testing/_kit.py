"""Running a handler through the service's own rules, without a broker.

A `Runner` hands each message to a real `Consumer` (its real `Invoker`, retry policy,
publisher and settlement) attached to the fakes of `_fakes`, with a `task.Clock`. What the
consumer then does on the fake channels is read back as a `Result`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Union

from pika.exceptions import NackError, UnroutableError
from pika.spec import BasicProperties
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from .._consumer import Consumer, Delivery, Phase
from .._handler import Handler, Invoker
from .._message import Message
from .._outcome import Outcome as _Settled
from .._retry import ATTEMPTS, FAILURE, RETRIES, Decision, RetryPolicy, rung
from .._settings import Settings
from .._states import Event, Transition
from .._url import parse_url
from ._fakes import (
    FakeChannel,
    FakeConnection,
    ImmediateReactor,
    Sent,
    SynchronousThreadPool,
    connect,
)

__all__ = [
    "Confirm",
    "Incoming",
    "Outcome",
    "Parked",
    "Publish",
    "Result",
    "Retried",
    "Runner",
    "message",
]


class Outcome(enum.Enum):
    """What became of a message."""

    ACKED = "acked"  # the handler succeeded, and every publish it made was confirmed
    RETRIED = "retried"  # a confirmed copy waits in a retry queue; the original was acked
    PARKED = "parked"  # a confirmed copy is in the dead-letter queue; the original was acked
    HANDED_BACK = "handed back"  # given back to the broker (reject or nack, with requeue)
    PAUSED = "paused"  # handed back unharmed, and the service paused (`Result.paused` says why)


#: The consumer's own outcomes (the metrics' labels) as a handler author sees them.
_SETTLED_AS: dict[_Settled, Outcome] = {
    _Settled.ACKED: Outcome.ACKED,
    _Settled.RETRIED: Outcome.RETRIED,
    _Settled.DEAD_LETTERED: Outcome.PARKED,
    _Settled.REJECTED: Outcome.HANDED_BACK,
    _Settled.REQUEUED: Outcome.HANDED_BACK,
}


class Confirm(enum.Enum):
    """How the (fake) broker answers a publish."""

    ACK = "ack"  # confirmed at once
    NACK = "nack"  # nacked at once
    UNROUTABLE = "unroutable"  # returned as unroutable (what a mandatory publish can get)
    TIMEOUT = "timeout"  # never answered: the publish fails after --publish-timeout


@dataclass(frozen=True)
class Publish:
    """One publish the consumer made: the handler's own, or a retry or dead-letter copy."""

    exchange: str
    routing_key: str
    body: bytes
    properties: BasicProperties
    mandatory: bool
    #: How the broker answered it.
    confirm: Confirm
    #: True for the service's retry or dead-letter copy of the message.
    copy: bool

    @property
    def headers(self) -> dict[str, Any]:
        """Its headers (an empty dict when it has none)."""
        return dict(self.properties.headers or {})


@dataclass(frozen=True)
class Retried:
    """Where a retried message waits, and for how long."""

    #: The retry queue, ``<queue>.retry.<seconds>s``.
    queue: str
    #: The ladder's rung the delay was rounded up to: the wait, in seconds.
    delay: int
    #: The delay the schedule or ``Retry(delay=...)`` asked for.
    wanted: float
    #: Which retry this is (the copy's ``consumer-svc-retries``), from 1.
    retry: int


@dataclass(frozen=True)
class Parked:
    """Where a message given up on was parked, and why."""

    queue: str
    #: ``consumer-svc-failure``: the failure, in one line.
    reason: str
    #: ``consumer-svc-attempts``.
    attempts: int


@dataclass(frozen=True)
class Result:
    """How one message left the service."""

    outcome: Outcome
    #: What the handler raised or failed with (a CancelledError when it timed out).
    error: BaseException | None = None
    #: The failure in one line, as logged (None when the handler succeeded).
    reason: str | None = None
    retried: Retried | None = None
    parked: Parked | None = None
    #: The handler's own publishes, in order.
    publishes: tuple[Publish, ...] = ()
    #: The retry or dead-letter copy (the last one, if the first was not confirmed).
    copy: Publish | None = None
    #: The handler ran past --handler-timeout and was cancelled.
    timed_out: bool = False
    #: The clock's seconds from the delivery to its settlement.
    seconds: float = 0.0
    #: Why the service paused (a `consumer_svc.Pause`, or failures in a row), if it did.
    paused: str | None = None


@dataclass(frozen=True)
class Incoming:
    """A message as the broker would deliver it; build one with `message`."""

    body: bytes
    properties: BasicProperties
    routing_key: str | None = None
    exchange: str = ""
    redelivered: bool = False
    delivery_tag: int = 1


def message(
    body: bytes | str = b"",
    *,
    headers: Mapping[str, Any] | None = None,
    properties: BasicProperties | None = None,
    routing_key: str | None = None,
    exchange: str = "",
    redelivered: bool = False,
    delivery_tag: int = 1,
) -> Incoming:
    """Build a message to run a handler on; a str body is encoded as UTF-8.

    ``headers`` go into (a copy of) ``properties``; the routing key defaults to the
    runner's queue, as for a message published to it through the default exchange.
    """
    props = BasicProperties() if properties is None else _copy_properties(properties)
    if headers is not None:
        props.headers = {**(props.headers or {}), **headers}
    data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    return Incoming(data, props, routing_key, exchange, redelivered, delivery_tag)


def _copy_properties(properties: BasicProperties) -> BasicProperties:
    copied = BasicProperties()
    for name, value in vars(properties).items():
        # A plain dict is copied; an UndecodableHeaders stays what it is.
        setattr(copied, name, dict(value) if type(value) is dict else value)
    return copied


@dataclass(frozen=True)
class _RecordingPolicy(RetryPolicy):
    """The real retry policy, noting each decision for the result."""

    decisions: list[tuple[BaseException, Decision]] = field(
        default_factory=list, compare=False, repr=False
    )

    def decide(self, error: BaseException, retries: int, reason: str) -> Decision:
        decision = super().decide(error, retries, reason)
        self.decisions.append((error, decision))
        return decision


class _NotingInvoker(Invoker):
    """The real `Invoker`, noting whether the handler gave a Deferred (or a coroutine)."""

    deferred = False

    def __call__(self, message: Message) -> Any:
        result = super().__call__(message)
        self.deferred = not self.blocking and isinstance(result, Deferred)
        return result


ConfirmRule = Union[Confirm, Callable[[Publish], Confirm]]


class Runner:
    """Runs a handler on messages by the service's rules: invocation, retries, parking, acks.

    ``settings`` are `Settings` fields (``queue``, ``max_retries``, ``retry_delay``,
    ``handler_timeout``, ``publish_timeout``, ``dead_letter_queue`` ...), as the options
    set them. ``confirm`` says how each publish is answered: one `Confirm` for all, or a
    function of the `Publish` (``publish.copy`` tells the service's copies apart).

    `run` gives a `Result` at once for a plain or ``@blocking`` handler (run in the calling
    thread), and a Deferred of it for a handler that returns a Deferred or a coroutine.
    The `clock` (a `task.Clock`) stands for the reactor's time: it moves only when the test
    moves it while a handler runs (``runner.clock.advance(600)`` passes --handler-timeout),
    and once the handler is done the runner moves it on until the message is settled
    (publish timeouts, the pause before a hand-back); `Result.seconds` says how far.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        confirm: ConfirmRule = Confirm.ACK,
        clock: Clock | None = None,
        tracer_provider: Any = None,
        **settings: Any,
    ) -> None:
        settings.setdefault("queue", "queue")
        settings.setdefault("stall_check", 0)  # no broker to ask
        self.settings = Settings(url=parse_url("amqp://guest:guest@localhost/"), **settings)
        self.handler = handler
        self.confirm = confirm
        self.clock = clock or Clock()
        self.pool = SynchronousThreadPool()
        self._tracing: Any = None
        if tracer_provider is not None:
            from .._tracing import Tracing

            self._tracing = Tracing(tracer_provider.get_tracer("consumer_svc"))

    def with_settings(self, **settings: Any) -> Runner:
        """Another runner on the same handler, clock and confirms, with some settings changed."""
        runner = Runner(self.handler, confirm=self.confirm, clock=self.clock)
        runner.settings = replace(self.settings, **settings)
        runner._tracing = self._tracing
        return runner

    def run(self, incoming: Incoming) -> Result | Deferred[Result]:
        """Deliver ``incoming`` to the handler and settle it as the service would."""
        return _Run(self, incoming).start()


class _Run:
    """One message through a consumer of its own."""

    def __init__(self, runner: Runner, incoming: Incoming) -> None:
        self.runner = runner
        self.incoming = incoming
        self.clock = runner.clock
        self.outcomes: list[_Settled] = []
        self.publishes: list[Publish] = []
        self.delivery: Delivery | None = None
        self.lost: list[str] = []
        self.policy = _RecordingPolicy(runner.settings.max_retries, runner.settings.retry_delay)
        self.invoke = _NotingInvoker(runner.handler, ImmediateReactor(), runner.pool)
        self.consumer = Consumer(runner.settings, self.invoke, self.clock)
        self.consumer.machine.subscribe(self._note_loss)
        self.consumer.policy = self.policy
        self.consumer.on_outcome = self.outcomes.append
        self.consumer.tracing = runner._tracing
        self.publishing = FakeChannel(self.clock, number=1)
        self.publishing.auto_confirm = False
        self.publishing.on_publish = self._answer
        self.channel = FakeChannel(self.clock, number=2)
        self.result: Deferred[Result] = Deferred()

    def _note_loss(self, transition: Transition) -> None:
        if transition.event is Event.SUBSCRIPTION_LOST:
            self.lost.append(transition.facts.reason)

    def start(self) -> Result | Deferred[Result]:
        connect(self.consumer.machine, FakeConnection(self.publishing, self.channel))
        incoming = self.incoming
        self.started = self.clock.seconds()
        self.channel.deliver(
            incoming.delivery_tag,
            incoming.body,
            properties=_copy_properties(incoming.properties),
            routing_key=self.runner.settings.queue
            if incoming.routing_key is None
            else incoming.routing_key,
            exchange=incoming.exchange,
            redelivered=incoming.redelivered,
        )
        pending = [d for d in self.consumer.inflight]
        self.delivery = pending[0] if pending else None
        delivery = self.delivery
        if (
            delivery is not None
            and delivery.phase is Phase.HANDLING
            and delivery.result is not None
        ):
            # A pending Deferred or coroutine: settled once it is done.
            delivery.result.addBoth(self._handled)
            return self.result
        self._fast_forward()
        result = self._result()
        return succeed(result) if self.invoke.deferred else result

    def _handled(self, _: object) -> None:
        self._fast_forward()
        self.result.callback(self._result())

    def _fast_forward(self) -> None:
        """Move the clock on to each next timer until the message is settled."""
        for _ in range(1_000_000):
            if self.outcomes:
                break
            calls = self.clock.getDelayedCalls()
            if not calls:
                break
            next_call = min(call.getTime() for call in calls)
            self.clock.advance(max(0.0, next_call - self.clock.seconds()))
        self.clock.advance(0)  # the acks wait for the end of the turn

    def _answer(self, sent: Sent) -> None:
        delivery = self.delivery or next(iter(self.consumer.inflight), None)
        copy = delivery is not None and delivery.phase is not Phase.HANDLING
        properties = sent.properties if sent.properties is not None else BasicProperties()
        publish = Publish(
            sent.exchange,
            sent.routing_key,
            sent.body,
            properties,
            sent.mandatory,
            Confirm.ACK,
            copy,
        )
        rule = self.runner.confirm
        answer = rule if isinstance(rule, Confirm) else rule(publish)
        self.publishes.append(replace(publish, confirm=answer))
        if answer is Confirm.ACK:
            sent.confirm.callback(None)
        elif answer is Confirm.NACK:
            sent.confirm.errback(NackError([]))
        elif answer is Confirm.UNROUTABLE:
            sent.confirm.errback(UnroutableError([]))
        # Confirm.TIMEOUT: never answered; the publisher gives up after --publish-timeout.

    def _result(self) -> Result:
        if not self.outcomes:
            raise RuntimeError(
                f"the message was not settled: the consumer lost its channel ({self.lost})"
                if self.lost
                else "the message was not settled (nothing left on the clock to wait for)"
            )
        outcome = _SETTLED_AS[self.outcomes[-1]]
        paused = self.consumer.paused
        if paused is not None and outcome is Outcome.HANDED_BACK:
            outcome = Outcome.PAUSED
        own = tuple(p for p in self.publishes if not p.copy)
        copies = [p for p in self.publishes if p.copy]
        copy = copies[-1] if copies else None
        error: BaseException | None = None
        reason: str | None = None
        decision: Decision | None = None
        if self.policy.decisions:
            error, decision = self.policy.decisions[-1]
            reason = decision.reason
        elif copy is not None:
            reason = str(copy.headers.get(FAILURE, "")) or None
        retried = parked = None
        if outcome is Outcome.RETRIED and copy is not None:
            wanted = decision.delay if decision is not None else 0.0
            retried = Retried(copy.routing_key, rung(wanted), wanted, int(copy.headers[RETRIES]))
        if outcome is Outcome.PARKED and copy is not None:
            parked = Parked(
                copy.routing_key, str(copy.headers[FAILURE]), int(copy.headers[ATTEMPTS])
            )
        return Result(
            outcome=outcome,
            error=error,
            reason=reason,
            retried=retried,
            parked=parked,
            publishes=own,
            copy=copy,
            timed_out=self.delivery is not None and self.delivery.timed_out,
            seconds=self.clock.seconds() - self.started,
            paused=None if paused is None else paused.cause,
        )
