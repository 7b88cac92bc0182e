"""Small synchronous AMQP helpers for tests, on pika's BlockingConnection.

Each call opens its own short connection and closes it. They block, so a Twisted test calls
them through ``twisted.internet.threads.deferToThread`` to keep the reactor turning::

    await deferToThread(publish, rabbit.url(), queue_name, [b"one", b"two"])

Connections are named ``tests.amqp_tools`` (client property ``connection_name``), so
``RabbitNode.list_connections()`` tells them apart from the service's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from .waiting import poll_until  # the synchronous wait lives with its async twin

__all__ = [
    "CONNECTION_NAME",
    "Message",
    "connect",
    "declare",
    "delete",
    "get_all",
    "get_messages",
    "poll_until",
    "publish",
    "purge",
    "queue_counts",
]

CONNECTION_NAME = "tests.amqp_tools"


@dataclass(frozen=True)
class Message:
    """One message taken from a queue with ``basic.get``."""

    body: bytes
    properties: pika.BasicProperties
    routing_key: str
    redelivered: bool

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})


def connect(
    url: str, *, timeout: float = 10.0, name: str = CONNECTION_NAME
) -> pika.BlockingConnection:
    """Open a BlockingConnection whose every wait, including a blocked publish, is bounded."""
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = timeout
    params.stack_timeout = timeout
    params.blocked_connection_timeout = timeout
    params.client_properties = {"connection_name": name}
    return pika.BlockingConnection(params)


@contextmanager
def _channel(url: str, timeout: float = 10.0) -> Iterator[BlockingChannel]:
    connection = connect(url, timeout=timeout)
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def declare(
    url: str, queue: str, *, durable: bool = True, arguments: Mapping[str, Any] | None = None
) -> None:
    """Declare ``queue`` (durable by default), as the service would."""
    with _channel(url) as channel:
        channel.queue_declare(queue, durable=durable, arguments=dict(arguments or {}))


def publish(
    url: str,
    queue: str,
    bodies: Iterable[bytes | str],
    *,
    persistent: bool = True,
    headers: Mapping[str, Any] | None = None,
    exchange: str = "",
    declare: bool = True,
    queue_arguments: Mapping[str, Any] | None = None,
    reply_to: str | None = None,
) -> None:
    """Publish each body to ``queue`` with publisher confirms; raise unless all are confirmed.

    ``mandatory`` is set, so a message that reaches no queue raises ``UnroutableError``
    instead of vanishing; a nack raises ``NackError``.
    """
    properties = pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Persistent if persistent else pika.DeliveryMode.Transient,
        headers=dict(headers) if headers else None,
        reply_to=reply_to,
    )
    with _channel(url) as channel:
        if declare:
            channel.queue_declare(queue, durable=True, arguments=dict(queue_arguments or {}))
        channel.confirm_delivery()
        for body in bodies:
            data = body.encode() if isinstance(body, str) else body
            # With confirms on, basic_publish waits for the broker's ack and raises otherwise.
            channel.basic_publish(exchange, queue, data, properties, mandatory=True)


def queue_counts(url: str, queue: str) -> tuple[int, int]:
    """``(messages ready, consumers)`` of an existing queue, by a passive declare."""
    with _channel(url) as channel:
        frame = channel.queue_declare(queue, passive=True)
        return frame.method.message_count, frame.method.consumer_count


def purge(url: str, queue: str) -> int:
    """Drop the ready messages of ``queue``; return how many."""
    with _channel(url) as channel:
        return int(channel.queue_purge(queue).method.message_count)


def delete(url: str, queue: str) -> None:
    """Delete ``queue`` (no error if it is already gone); its consumers get ``basic.cancel``."""
    with _channel(url) as channel:
        channel.queue_delete(queue)


def get_messages(url: str, queue: str, *, limit: int = 10_000) -> list[Message]:
    """Take every ready message from ``queue`` with ``basic.get`` and ack it."""
    messages: list[Message] = []
    with _channel(url) as channel:
        while len(messages) < limit:
            method, properties, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            channel.basic_ack(method.delivery_tag)
            messages.append(Message(body, properties, method.routing_key, method.redelivered))
    return messages


def get_all(url: str, queue: str) -> list[bytes]:
    """Take every ready message from ``queue`` (e.g. a dead-letter queue); return the bodies."""
    return [m.body for m in get_messages(url, queue)]
