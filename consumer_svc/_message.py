"""The message a handler receives."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ._errors import UndecodableBody

if TYPE_CHECKING:
    from pika.spec import BasicProperties


class Message:
    """One delivery from the queue, as the handler sees it.

    The message is acknowledged only after the handler's result succeeded.
    """

    __slots__ = ("body", "delivery_tag", "exchange", "properties", "redelivered", "routing_key")

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

    @property
    def headers(self) -> dict[str, Any]:
        """The application headers (an empty dict when the message has none)."""
        return self.properties.headers or {}

    def json(self) -> Any:
        """The body decoded as JSON; raises `UndecodableBody` when it is not JSON."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise UndecodableBody(
                f"body of message {self.delivery_tag} ({len(self.body)} bytes) is not JSON: {e}"
            ) from None

    def __repr__(self) -> str:
        return (
            f"<Message tag={self.delivery_tag} exchange={self.exchange!r} "
            f"routing_key={self.routing_key!r} size={len(self.body)}>"
        )
