"""Confirmed publishing: every publish is confirmed by the broker, or fails within a deadline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pika import exceptions as pika_errors
from pika.spec import BasicProperties
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ._channel import Channel
from ._errors import PublishFailed, PublishRefused

if TYPE_CHECKING:
    from ._tracing import Trace


class Publisher:
    """Publishes on a channel of its own, in confirm mode.

    A publish fires once the broker confirmed it, and fails with
    `PublishFailed` when it was nacked, returned as unroutable, not confirmed
    within ``timeout`` seconds (e.g. while a resource alarm blocks the
    connection), or when there is no open channel.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self.channel: Channel | None = None
        #: Set by the service while the broker blocks the connection.
        self.blocked = False

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties | None = None,
        *,
        mandatory: bool = False,
        trace: Trace | None = None,
    ) -> Deferred[None]:
        """Publish; with a ``trace``, in a PRODUCER span whose context the message carries."""
        if trace is not None:
            return trace.publish(self._publish, exchange, routing_key, body, properties, mandatory)
        return self._publish(exchange, routing_key, body, properties, mandatory)

    def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties | None,
        mandatory: bool,
    ) -> Deferred[None]:
        channel = self.channel
        if channel is None or not channel.is_open:
            return fail(PublishFailed("not connected to the broker"))
        try:
            confirmed = channel.publish(
                exchange, routing_key, body, properties, mandatory=mandatory
            )
        except Exception as e:
            return fail(PublishFailed(f"{type(e).__name__}: {e}"))
        where = f"exchange {exchange!r} with routing key {routing_key!r}"
        result: Deferred[None] = Deferred()

        def expired() -> None:
            why = " (the broker has blocked the connection)" if self.blocked else ""
            result.errback(
                PublishFailed(f"no confirm from the broker within {self.timeout:g}s{why}: {where}")
            )

        deadline = self.clock.callLater(self.timeout, expired)

        def done(outcome: Any) -> None:
            if not deadline.active():
                return None  # timed out already; a late confirm changes nothing
            deadline.cancel()
            if isinstance(outcome, Failure):
                result.errback(_explain(outcome, where))
            else:
                result.callback(None)
            return None

        confirmed.addBoth(done)
        return result


def _explain(failure: Failure, where: str) -> PublishFailed:
    error = failure.value
    if isinstance(error, pika_errors.UnroutableError):
        return PublishFailed(f"unroutable: no queue is bound to {where}")
    if isinstance(error, pika_errors.NackError):
        return PublishFailed(f"the broker nacked the publish to {where}")
    if isinstance(error, pika_errors.ChannelClosedByBroker):
        return PublishRefused(
            f"the broker closed the channel ({error.reply_code} {error.reply_text}): {where}"
        )
    if isinstance(error, pika_errors.ChannelClosed):
        return PublishFailed(f"the channel closed ({error.reply_code} {error.reply_text}): {where}")
    return PublishFailed(f"{type(error).__name__}: {error}: {where}")
