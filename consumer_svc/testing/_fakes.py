"""Typed fakes of the broker side, for driving the real `Consumer` without a broker.

`FakeChannel` stands in for ``consumer_svc._channel.Channel`` and `FakeConnection` for
``AMQPConnection``; each records what the consumer did with it. `FakeNotifier` is the real
`Notifier` recording what it would tell systemd. `invoker` gives the real `Invoker` on a
`SynchronousThreadPool` and an `ImmediateReactor`, so a ``@blocking`` handler runs in the
calling thread.

To the type checker each fake *is* the object it stands in for (see `_ChannelBase`), so a test
passes it where the service takes the real one without a cast, and mypy holds every method a
fake overrides to the real one's signature. At run time they are plain classes:
tests/unit/test_testing.py checks that each has every public method of the real object, with
the same parameters. Between the two, the fakes cannot drift from what they stand in for.

Nothing here imports the reactor or pika's Twisted adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pika import spec
from pika.exceptions import ChannelClosedByBroker
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .._handler import Handler, Invoker
from .._notify import Notifier
from .._states import Event, Facts, Machine

if TYPE_CHECKING:
    from typing import TypeVar

    from twisted.internet.testing import StringTransport
    from typing_extensions import ParamSpec

    # The real classes import pika's Twisted adapter, hence the reactor: only mypy sees them.
    from .._channel import Channel
    from .._connection import AMQPConnection

    _ChannelBase = Channel
    _ConnectionBase = AMQPConnection

    _P = ParamSpec("_P")
    _R = TypeVar("_R")
else:
    _ChannelBase = _ConnectionBase = object

__all__ = [
    "FakeChannel",
    "FakeConnection",
    "FakeNotifier",
    "ImmediateReactor",
    "Sent",
    "SynchronousThreadPool",
    "connect",
    "invoker",
]


@dataclass(eq=False)
class Sent:
    """One publish on a `FakeChannel`: what was sent, and the confirm the publisher waits for."""

    exchange: str
    routing_key: str
    body: bytes
    properties: spec.BasicProperties | None
    mandatory: bool
    confirm: Deferred[None] = field(default_factory=Deferred)

    @property
    def headers(self) -> dict[str, Any]:
        """The publish's headers (an empty dict when it has none)."""
        headers = self.properties.headers if self.properties is not None else None
        return dict(headers or {})


class FakeChannel(_ChannelBase):
    """Stands in for consumer_svc._channel.Channel and records what the consumer does with it.

    Publishes are confirmed at once while ``auto_confirm`` is true; otherwise each waits in
    ``confirms`` for the test to fire it, unless ``on_publish`` (called with each `Sent`)
    settles it first. Acks are what reached the wire: see `settled`.
    """

    # The real channel's are read-only properties; a test sets these.
    number: int
    is_open: bool

    def __init__(self, clock: Clock | None = None, number: int = 1) -> None:
        self.clock = clock
        self.number = number
        self.is_open = True
        self.closed: Deferred[BaseException] = Deferred()
        self.close_reason: BaseException | None = None
        self.on_cancelled: Callable[[], None] | None = None
        self._settled: list[tuple[str, int]] = []
        self.declared: dict[str, Any] = {}
        self.exchanges: dict[str, str] = {}
        self.bindings: list[tuple[str, str, str]] = []
        #: (routing key, body, headers) of each publish, in order.
        self.published: list[tuple[str, bytes, dict[str, Any]]] = []
        #: Each publish in full, with its confirm.
        self.sent: list[Sent] = []
        #: The confirms left for the test to fire (``auto_confirm`` false).
        self.confirms: list[Deferred[None]] = []
        self.auto_confirm = True
        self.on_publish: Callable[[Sent], None] | None = None
        self.on_message: Callable[[Any, Any, spec.BasicProperties, bytes], None] | None = None
        self.prefetch: int | None = None
        self.confirming = False
        self.cancelled = False
        self.refuse_declares: Exception | None = None
        #: Every prefetch asked for, in order (the last one is ``prefetch``).
        self.prefetches: list[int] = []
        #: How often the consumer subscribed (each subscription gets its own tag).
        self.subscriptions = 0
        #: The ready messages a (passive) declare reports.
        self.ready = 0

    # -- what consumer_svc._channel.Channel offers

    def declare_queue(
        self, queue: str, *, passive: bool = False, arguments: Mapping[str, Any]
    ) -> Deferred[Any]:
        if self.refuse_declares is not None:
            return fail(self.refuse_declares)
        self.declared[queue] = arguments
        return succeed(_DeclareOk(self.ready))

    def declare_exchange(self, exchange: str, exchange_type: str) -> Deferred[Any]:
        self.exchanges[exchange] = exchange_type
        return succeed(None)

    def bind(self, queue: str, exchange: str, routing_key: str) -> Deferred[Any]:
        self.bindings.append((queue, exchange, routing_key))
        return succeed(None)

    def qos(self, prefetch: int) -> Deferred[Any]:
        self.prefetch = prefetch
        self.prefetches.append(prefetch)
        return succeed(None)

    def confirm(self) -> Deferred[Any]:
        self.confirming = True
        return succeed(None)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.BasicProperties | None,
        *,
        mandatory: bool,
    ) -> Deferred[Any]:
        sent = Sent(exchange, routing_key, body, properties, mandatory)
        self.sent.append(sent)
        self.published.append((routing_key, body, sent.headers))
        if self.on_publish is not None:
            self.on_publish(sent)
        if sent.confirm.called:
            return sent.confirm
        if self.auto_confirm:
            sent.confirm.callback(None)
        else:
            self.confirms.append(sent.confirm)
        return sent.confirm

    def consume(
        self, queue: str, on_message: Callable[[Any, Any, spec.BasicProperties, bytes], None]
    ) -> Deferred[str]:
        self.on_message = on_message
        self.subscriptions += 1
        self.cancelled = False
        return succeed(f"ctag{self.subscriptions}")

    def cancel(self, consumer_tag: str) -> Deferred[Any]:
        self.cancelled = True
        return succeed(None)

    def soon(self, call: Callable[[], None]) -> None:
        """As the real channel: after the current read, here the Clock's next turn."""
        if self.clock is None:
            call()
        else:
            self.clock.callLater(0, call)

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._settled.append(("ack up to" if multiple else "ack", delivery_tag))

    def nack(self, delivery_tag: int, requeue: bool = True) -> None:
        self._settled.append(("requeue" if requeue else "drop", delivery_tag))

    def reject(self, delivery_tag: int, requeue: bool = False) -> None:
        self._settled.append(("reject+requeue" if requeue else "reject", delivery_tag))

    def close(self) -> None:
        self.is_open = False

    # -- for the test

    @property
    def settled(self) -> list[tuple[str, int]]:
        """What was settled on the wire, once the current reactor turn ended (acks wait for it)."""
        if self.clock is not None:
            self.clock.advance(0)
        return self._settled

    def deliver(
        self,
        tag: int,
        body: bytes = b"x",
        headers: Mapping[str, Any] | None = None,
        *,
        properties: spec.BasicProperties | None = None,
        routing_key: str = "q",
        exchange: str = "",
        redelivered: bool = False,
    ) -> None:
        """Hand the consumer a delivery, as pika would after a basic.deliver frame."""
        if self.on_message is None:
            raise RuntimeError("nothing consumes from this channel")
        if properties is None:
            properties = spec.BasicProperties()
        if headers is not None:
            properties.headers = headers
        method = spec.Basic.Deliver(
            consumer_tag="ctag",
            delivery_tag=tag,
            redelivered=redelivered,
            exchange=exchange,
            routing_key=routing_key,
        )
        self.on_message(self, method, properties, body)

    def die(self, reason: BaseException | None = None) -> None:
        """The broker closes the channel (by default over a double ack)."""
        self.is_open = False
        self.close_reason = reason or ChannelClosedByBroker(
            406, "PRECONDITION_FAILED - unknown delivery tag 1"
        )
        self.closed.callback(self.close_reason)


class _DeclareOk:
    """What a queue declare answers: the frame with its method's message count."""

    def __init__(self, ready: int) -> None:
        self.method = type("DeclareOk", (), {"message_count": ready, "consumer_count": 0})()


class FakeConnection(_ConnectionBase):
    """Stands in for AMQPConnection: hands out the publisher channel first, then the consumer
    channel, then new ones (declares); a shutdown is recorded and done at once."""

    def __init__(self, *channels: FakeChannel) -> None:
        self.channels = list(channels)
        #: As AMQPConnection's: the handshake finished (a fake connection is handed over open).
        self.opened = True
        #: Every channel handed out, in order.
        self.channels_opened: list[FakeChannel] = []
        self.lost = False
        #: Makes each declare on a channel of its own fail with this, if set.
        self.refuse_declares: Exception | None = None
        #: The ready messages a declare on a channel of its own reports.
        self.ready = 0
        #: None: no socket. The service aborts the transport of a connection that will not close.
        self.transport: StringTransport | None = None
        #: The timeout of each shutdown the service asked for, in order.
        self.shutdowns: list[float] = []

    def open_channel(self) -> Deferred[Channel]:
        if self.channels:
            channel = self.channels.pop(0)
        else:  # a channel of its own for a declare
            channel = FakeChannel(number=len(self.channels_opened) + 1)
            channel.refuse_declares = self.refuse_declares
            channel.ready = self.ready
        self.channels_opened.append(channel)
        return succeed(channel)

    def shutdown(self, timeout: float) -> Deferred[None]:
        self.shutdowns.append(timeout)
        return succeed(None)

    @property
    def declared(self) -> dict[str, Any]:
        """Every queue declared on any channel, with its arguments."""
        found: dict[str, Any] = {}
        for channel in self.channels_opened:
            found.update(channel.declared)
        return found


def connect(machine: Machine, connection: FakeConnection) -> None:
    """Tell ``machine`` that ``connection`` opened, as the service does; the consumer sets up on it."""
    machine.fire(Event.CONNECT)
    machine.fire(Event.CONNECTED, Facts(connection=connection))


class SynchronousThreadPool(ThreadPool):
    """A thread pool that has no threads: each call runs at once, in the calling thread."""

    def __init__(self) -> None:
        super().__init__(minthreads=0, maxthreads=1, name="synchronous")
        self.calls = 0

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, _R], object] | None,
        func: Callable[_P, _R],
        *args: _P.args,
        **kw: _P.kwargs,
    ) -> None:
        self.calls += 1
        try:
            result = func(*args, **kw)
        except BaseException:
            if onResult is not None:
                # Twisted's own annotation says _R, but a failure is reported as a Failure.
                onResult(False, Failure())  # type: ignore[arg-type]
            return
        if onResult is not None:
            onResult(True, result)


class ImmediateReactor:
    """Just enough of a reactor for ``deferToThreadPool``: "from the thread" is now."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def invoker(handler: Handler, reactor: Any = None) -> Invoker:
    """The real `Invoker` of ``handler``, its ``@blocking`` calls run at once in this thread.

    ``reactor`` (by default an `ImmediateReactor`) needs ``callFromThread``, and whatever the
    handler's kind asks of it (the asyncio reactor's loop, say).
    """
    return Invoker(
        handler, ImmediateReactor() if reactor is None else reactor, SynchronousThreadPool()
    )


class FakeNotifier(Notifier):
    """The real `Notifier` without a socket: records what it would tell systemd."""

    def __init__(self, watchdog_interval: float | None = None) -> None:
        super().__init__(environ={})
        self.watchdog_interval = watchdog_interval
        self.sent: list[dict[str, str | int]] = []
        self.closed = 0

    @property
    def enabled(self) -> bool:
        return True

    def notify(self, **fields: str | int) -> None:
        self.sent.append(fields)

    def close(self) -> None:
        self.closed += 1
