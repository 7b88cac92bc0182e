"""The message a handler receives."""

from __future__ import annotations

import json
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from pika.spec import BasicProperties
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from ._errors import Reject, UndecodableBody

if TYPE_CHECKING:
    from ._publisher import Publisher
    from ._tracing import Trace


#: How much of a message_id log lines show.
_ID_PREVIEW = 64
#: Where replies may always go: queues the broker named (``amq.gen-*``; nobody can
#: declare an ``amq.`` name) and RabbitMQ's direct reply-to pseudo-queue.
REPLY_TO_ALWAYS = ("amq.gen-*", "amq.rabbitmq.reply-to*")


def reply_allowed(reply_to: str, allowed: Iterable[str] = ()) -> bool:
    """Whether a reply may be published to ``reply_to``: it matches a default or an allowed glob."""
    return any(fnmatchcase(reply_to, pattern) for pattern in (*REPLY_TO_ALWAYS, *allowed))


class Message:
    """One delivery from the queue, as the handler sees it.

    The message is acknowledged only after the handler's result succeeded.
    """

    __slots__ = (
        "_channel",
        "_publisher",
        "_publishes",
        "_reply_to_allow",
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
        #: Which consuming channel of this process delivered it (1, 2, ... across reconnects).
        self._channel: int | None = None
        #: --reply-to-allow: globs of further queues replies may go to.
        self._reply_to_allow: tuple[str, ...] = ()
        #: The delivery's span while tracing is on: publishes are its children.
        self._trace: Trace | None = None

    @property
    def name(self) -> str:
        """How log lines name this message, stable across reconnects.

        ``message 'order-42'`` (its ``message_id``, quoted and escaped) if it has
        one, else ``message 7 of channel 3``: its delivery tag, and which of this
        process's consuming channels delivered it (tags start again on each channel).
        """
        message_id = self.properties.message_id
        if message_id:
            return f"message {str(message_id)[:_ID_PREVIEW]!r}"
        channel = f" of channel {self._channel}" if self._channel is not None else ""
        return f"message {self.delivery_tag}{channel}"

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
        return self._track(confirmed)

    def _track(self, confirmed: Deferred[None]) -> Deferred[None]:
        """The ack waits for ``confirmed``; its failure fails the message even if nobody waits for it."""
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
        """Answer an RPC request: publish to its ``reply_to`` with its ``correlation_id``.

        Only to a queue replies belong in: one the broker named (``amq.gen-*``),
        direct reply-to (``amq.rabbitmq.reply-to*``), or one that --reply-to-allow
        names. Otherwise, and when there is no ``reply_to``, nothing is published
        and the Deferred fails with `consumer_svc.Reject`: the message is parked,
        whether or not the handler waits for the reply.
        """
        reply_to = self.properties.reply_to
        if not reply_to:
            return self._track(fail(Reject("the request has no reply_to to answer")))
        if not reply_allowed(reply_to, self._reply_to_allow):
            allowed = ", ".join((*REPLY_TO_ALWAYS, *self._reply_to_allow))
            return self._track(
                fail(
                    Reject(
                        f"reply_to {reply_to[:100]!r} is not a queue replies may go to "
                        f"({allowed}; see --reply-to-allow)"
                    )
                )
            )
        properties = properties or BasicProperties()
        if properties.correlation_id is None:
            properties.correlation_id = self.properties.correlation_id
        return self.publish("", reply_to, body, properties)

    def __repr__(self) -> str:
        return (
            f"<Message tag={self.delivery_tag} exchange={self.exchange!r} "
            f"routing_key={self.routing_key!r} size={len(self.body)}>"
        )
