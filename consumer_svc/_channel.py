"""One AMQP channel, as the consumer, the publisher and the topology use it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pika import exceptions as pika_errors
from pika import spec
from twisted.internet.defer import Deferred, fail

if TYPE_CHECKING:
    # Importing pika's Twisted adapter installs the default reactor: a type only, here.
    from pika.adapters.twisted_connection import TwistedChannel


class Channel:
    """The few channel operations the consumer needs, with pika's quirks contained.

    Declarations go through pika's `TwistedChannel` (its RPC Deferreds fail
    when the channel closes); consuming uses the plain pika channel so that a
    delivery costs a function call, not a Deferred.
    """

    def __init__(self, channel: TwistedChannel, soon: Callable[[Callable[[], None]], None]) -> None:
        self._twisted: Any = channel
        #: Runs a call at the end of the current read, or on the next reactor turn.
        self.soon = soon
        self._pika: Any = channel._channel
        self._pending: set[Deferred[Any]] = set()
        self.closed: Deferred[BaseException] = Deferred()
        self.close_reason: BaseException | None = None
        self.on_cancelled: Callable[[], None] | None = None
        channel.on_closed.addCallback(self._on_closed)
        self._pika.add_on_cancel_callback(self._on_cancel)

    @property
    def number(self) -> int:
        return int(self._pika.channel_number)

    @property
    def is_open(self) -> bool:
        return bool(self._pika.is_open)

    def _on_closed(self, reason: BaseException) -> None:
        self.close_reason = reason
        pending, self._pending = self._pending, set()
        for d in pending:
            d.errback(reason)
        self.closed.callback(reason)

    def _on_cancel(self, _frame: object) -> None:
        if self.on_cancelled is not None:
            self.on_cancelled()

    def _rpc(self, start: Callable[[Callable[[Any], None]], None]) -> Deferred[Any]:
        if not self.is_open:
            return fail(
                self.close_reason or pika_errors.ChannelWrongStateError("channel is closed")
            )
        d: Deferred[Any] = Deferred()
        self._pending.add(d)

        def done(result: Any) -> None:
            if d in self._pending:
                self._pending.discard(d)
                d.callback(result)

        try:
            start(done)
        except Exception:
            self._pending.discard(d)
            return fail()
        return d

    def declare_queue(
        self, queue: str, *, passive: bool = False, arguments: Mapping[str, Any]
    ) -> Deferred[Any]:
        """Declare a durable queue (or, passively, check that it exists)."""
        d: Deferred[Any] = self._twisted.queue_declare(
            queue=queue, passive=passive, durable=True, arguments=dict(arguments) or None
        )
        return d

    def declare_exchange(self, exchange: str, exchange_type: str) -> Deferred[Any]:
        d: Deferred[Any] = self._twisted.exchange_declare(
            exchange=exchange, exchange_type=exchange_type, durable=True
        )
        return d

    def bind(self, queue: str, exchange: str, routing_key: str) -> Deferred[Any]:
        d: Deferred[Any] = self._twisted.queue_bind(
            queue=queue, exchange=exchange, routing_key=routing_key
        )
        return d

    def qos(self, prefetch: int) -> Deferred[Any]:
        # Per consumer, never global: RabbitMQ 4.3 rejects global QoS.
        d: Deferred[Any] = self._twisted.basic_qos(prefetch_count=prefetch, global_qos=False)
        return d

    def confirm(self) -> Deferred[Any]:
        """Put the channel in publisher-confirm mode."""
        d: Deferred[Any] = self._twisted.confirm_delivery()
        return d

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.BasicProperties | None,
        *,
        mandatory: bool,
    ) -> Deferred[Any]:
        """Publish; in confirm mode the Deferred fires on the broker's ack."""
        d: Deferred[Any] = self._twisted.basic_publish(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            properties=properties,
            mandatory=mandatory,
        )
        return d

    def consume(
        self, queue: str, on_message: Callable[[Channel, Any, spec.BasicProperties, bytes], None]
    ) -> Deferred[str]:
        """Start consuming; fires with the consumer tag once the broker confirmed it."""

        def deliver(_channel: object, method: Any, properties: Any, body: bytes) -> None:
            on_message(self, method, properties, body)

        return self._rpc(
            lambda done: self._pika.basic_consume(
                queue,
                deliver,
                auto_ack=False,
                callback=lambda frame: done(frame.method.consumer_tag),
            )
        )

    def cancel(self, consumer_tag: str) -> Deferred[Any]:
        return self._rpc(lambda done: self._pika.basic_cancel(consumer_tag, callback=done))

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._pika.basic_ack(delivery_tag, multiple)

    def nack(self, delivery_tag: int, requeue: bool = True) -> None:
        self._pika.basic_nack(delivery_tag, False, requeue)

    def reject(self, delivery_tag: int, requeue: bool = False) -> None:
        self._pika.basic_reject(delivery_tag, requeue)

    def close(self) -> None:
        if self.is_open:
            self._pika.close()
