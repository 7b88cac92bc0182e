"""Typed fakes of the broker side, for driving the real `Consumer` without a broker.

`FakeChannel` stands in for ``consumer_svc._channel.Channel`` and `FakeConnection` for
``AMQPConnection``; each records what the consumer did with it. `SynchronousThreadPool` and
`ImmediateReactor` let the real `Invoker` run a ``@blocking`` handler in the calling thread.
tests/test_testing.py checks that each fake has every public method of the real object, with
the same parameters, so that the fakes cannot drift from what they stand in for.

Nothing here imports the reactor or pika's Twisted adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pika import spec
from pika.exceptions import ChannelClosedByBroker
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from .._states import Event, Facts, Machine

__all__ = [
    "FakeChannel",
    "FakeConnection",
    "ImmediateReactor",
    "Sent",
    "SynchronousThreadPool",
    "connect",
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


class FakeChannel:
    """Stands in for consumer_svc._channel.Channel and records what the consumer does with it.

    Publishes are confirmed at once while ``auto_confirm`` is true; otherwise each waits in
    ``confirms`` for the test to fire it, unless ``on_publish`` (called with each `Sent`)
    settles it first. Acks are what reached the wire: see `settled`.
    """

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


class FakeConnection:
    """Hands out the publisher channel first, then the consumer channel, then new ones (declares)."""

    def __init__(self, *channels: FakeChannel) -> None:
        self.channels = list(channels)
        self.opened: list[FakeChannel] = []
        self.lost = False
        #: Makes each declare on a channel of its own fail with this, if set.
        self.refuse_declares: Exception | None = None
        #: The ready messages a declare on a channel of its own reports.
        self.ready = 0

    def open_channel(self) -> Deferred[FakeChannel]:
        if self.channels:
            channel = self.channels.pop(0)
        else:  # a channel of its own for a declare
            channel = FakeChannel(number=len(self.opened) + 1)
            channel.refuse_declares = self.refuse_declares
            channel.ready = self.ready
        self.opened.append(channel)
        return succeed(channel)

    @property
    def declared(self) -> dict[str, Any]:
        """Every queue declared on any channel, with its arguments."""
        found: dict[str, Any] = {}
        for channel in self.opened:
            found.update(channel.declared)
        return found


def connect(machine: Machine, connection: FakeConnection) -> None:
    """Tell ``machine`` that ``connection`` opened, as the service does; the consumer sets up on it."""
    machine.fire(Event.CONNECT)
    machine.fire(Event.CONNECTED, Facts(connection=connection))


class SynchronousThreadPool:
    """Stands in for the service's thread pool: runs each call at once, in the calling thread."""

    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], None] | None,
        func: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> None:
        self.calls += 1
        try:
            result = func(*args, **kw)
        except BaseException:
            if onResult is not None:
                onResult(False, Failure())
            return
        if onResult is not None:
            onResult(True, result)


class ImmediateReactor:
    """Just enough of a reactor for ``deferToThreadPool``: "from the thread" is now."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)
