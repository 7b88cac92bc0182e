"""The message a handler receives."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pika.spec import BasicProperties
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ._errors import UndecodableBody

if TYPE_CHECKING:
    from ._publisher import Publisher
    from ._tracing import Trace


class Message:
    """One delivery from the queue, as the handler sees it.

    The message is acknowledged only after the handler's result succeeded.
    """

    __slots__ = (
        "_publisher",
        "_publishes",
        "_trace",
        "body",
        "delivery_tag",
        "exchange",
        "properties",
        "redelivered",
        "routing_key",
    )

    def __init__(
        self,
        body: bytes,
        properties: BasicProperties,
        *,
        delivery_tag: int,
        routing_key: str,
        exchange: str,
        redelivered: bool,
    ) -> None:
        self.body = body
        self.properties = properties
        self.delivery_tag = delivery_tag
        self.routing_key = routing_key
        self.exchange = exchange
        self.redelivered = redelivered
        self._publisher: Publisher | None = None
        #: (what the handler got, what the ack waits for) for each publish.
        self._publishes: list[tuple[Deferred[None], Deferred[None]]] | None = None
        #: The delivery's span while tracing is on: publishes are its children.
        self._trace: Trace | None = None

    @property
    def headers(self) -> dict[str, Any]:
        """The application headers (an empty dict when the message has none).

        Headers that could not be decoded are an empty `UndecodableHeaders`
        (from ``consumer_svc._codec``) whose ``error`` says why.
        """
        headers = self.properties.headers
        return {} if headers is None else headers

    def json(self) -> Any:
        """The body decoded as JSON; raises `UndecodableBody` when it is not JSON."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise UndecodableBody(
                f"body of message {self.delivery_tag} ({len(self.body)} bytes) is not JSON: {e}"
            ) from None

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties | None = None,
        *,
        mandatory: bool = False,
    ) -> Deferred[None]:
        """Publish a message, confirmed by the broker; this message is acked only after it.

        The Deferred fires once the broker confirmed the publish, or fails
        with `consumer_svc.PublishFailed` (nacked; unroutable with
        ``mandatory=True``; not confirmed within --publish-timeout, e.g. while
        a resource alarm blocks the connection). A failed publish fails the
        handler, even if the handler did not wait for it.
        """
        if self._publisher is None:
            raise RuntimeError(
                "this message was not delivered by consumer_svc: nothing to publish with"
            )
        confirmed = self._publisher.publish(
            exchange, routing_key, body, properties, mandatory=mandatory, trace=self._trace
        )
        settled: Deferred[None] = Deferred()
        if self._publishes is None:
            self._publishes = []
        self._publishes.append((confirmed, settled))

        def note(result: object) -> object:
            if isinstance(result, Failure):
                settled.errback(result)
            else:
                settled.callback(None)
            return result

        confirmed.addBoth(note)
        return confirmed

    def reply(self, body: bytes, properties: BasicProperties | None = None) -> Deferred[None]:
        """Answer an RPC request: publish to its ``reply_to`` with its ``correlation_id``."""
        reply_to = self.properties.reply_to
        if not reply_to:
            raise ValueError(f"message {self.delivery_tag} has no reply_to to answer")
        properties = properties or BasicProperties()
        if properties.correlation_id is None:
            properties.correlation_id = self.properties.correlation_id
        return self.publish("", reply_to, body, properties)

    def __repr__(self) -> str:
        return (
            f"<Message tag={self.delivery_tag} exchange={self.exchange!r} "
            f"routing_key={self.routing_key!r} size={len(self.body)}>"
        )
