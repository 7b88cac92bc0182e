"""Publish hostile messages: headers RabbitMQ accepts that a naive client cannot decode.

The header table is encoded here, byte by byte, not by pika (whose codec the
service replaces, and which cannot write most of these), then spliced into the
content header frame. A test gives the headers as Python values, with wrappers
for what Python values cannot say, or as the raw table::

    from support import hostile
    with hostile.Publisher(node.url()) as pub:
        pub.publish(queue, b"far future", headers={"at": hostile.timestamp(2**63)})
        pub.publish(queue, b"deep", headers={"a": hostile.nested(1000, "A")})
        pub.publish(queue, b"float", headers={"ratio": 0.25, "f": hostile.Float32(1.5)})
        pub.publish(queue, b"raw", headers=hostile.encode_table({b"\\xff": "key not UTF-8"}))
    hostile.publish(node.url(), queue, b"one-off", headers={"x-death": [[None]]})

API
---
``Publisher(url, *, timeout=10.0)``
    A context manager holding one BlockingConnection (named ``tests.hostile``)
    and one channel in confirm mode. Blocking: from a Twisted test, call it
    through ``deferToThread``.
``Publisher.publish(routing_key, body=b"", *, headers=None, exchange="", mandatory=True, **properties)``
    Publish and wait for the broker's confirm. ``headers`` is a mapping
    (encoded by `encode_table`) or ``bytes``: a whole encoded field table,
    size prefix included, sent as is. ``properties`` are any other
    ``pika.BasicProperties`` fields (``content_type``, ``message_id``,
    ``user_id``, ``delivery_mode`` ...). Raises pika's ``UnroutableError``
    when no queue takes it, ``NackError`` on a nack, and
    ``ConnectionClosedByBroker`` (541 INTERNAL_ERROR) when RabbitMQ refuses
    the headers (a NaN or infinite float, type 'U', an unknown type): it
    closes the whole connection. A ``user_id`` other than the connection's
    user makes it close the channel (``ChannelClosedByBroker``, 406
    PRECONDITION_FAILED). Either way the `Publisher` is spent. ``CC`` and
    ``BCC`` headers (arrays of queue names) route copies to those queues too;
    the broker delivers ``CC`` and strips ``BCC``.
``Publisher.declare(queue, **arguments)``
    Declare a durable queue.
``publish(url, routing_key, body=b"", **kwargs)``
    One message on a connection of its own.

Values, in `encode_table` and `encode_value`:

- ``str`` 'S' (UTF-8), ``bytes`` 'x', ``bool`` 't', ``None`` 'V', ``float``
  'd', ``Decimal`` 'D', ``datetime`` 'T' (naive is UTC), ``list``/``tuple``
  'A', ``dict`` 'F'; ``int`` 'l' (int64 only: `INT64_MAX` is the largest);
- keys are ``str`` (UTF-8) or ``bytes``, sent as they are (e.g. ``b"\\xff"``,
  not UTF-8);
- `Raw` (``Raw(b"T" + struct.pack(">Q", 2**63))``): a field value as raw bytes,
  type octet first; `timestamp`, `nested` and `integer` build the usual ones;
- `Float32` ('f') and `Float64` ('d') choose a float's width.

Nothing here needs the service's codec, and importing it imports no reactor.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from types import TracebackType
from typing import Any

import pika
from pika import spec

__all__ = [
    "CONNECTION_NAME",
    "INT64_MAX",
    "INT64_MIN",
    "Float32",
    "Float64",
    "Publisher",
    "Raw",
    "encode_table",
    "encode_value",
    "integer",
    "nested",
    "publish",
    "timestamp",
]

CONNECTION_NAME = "tests.hostile"
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

_INTEGERS = {"b": ">b", "B": ">B", "s": ">h", "u": ">H", "U": ">h", "I": ">i", "i": ">I"}
_INTEGERS.update({"l": ">q", "L": ">q"})


@dataclass(frozen=True)
class Raw:
    """A field value given as its AMQP bytes, type octet first."""

    field: bytes


@dataclass(frozen=True)
class Float32:
    """A float sent as 'f' (32 bits)."""

    value: float


@dataclass(frozen=True)
class Float64:
    """A float sent as 'd' (64 bits), as a plain ``float`` is."""

    value: float


def timestamp(seconds: int) -> Raw:
    """A 'T' timestamp of any unsigned 64-bit ``seconds`` (past 253402300799 is after year 9999)."""
    return Raw(b"T" + struct.pack(">Q", seconds))


def integer(kind: str, value: int) -> Raw:
    """An integer of AMQP type ``kind``: b B s u U I i l L (RabbitMQ refuses 'U')."""
    return Raw(kind.encode() + struct.pack(_INTEGERS[kind], value))


def nested(depth: int, kind: str = "A", leaf: Any = None) -> Raw:
    """``leaf`` inside ``depth`` arrays ('A') or tables ('F', each with the one key ``"n"``).

    Built without recursion, so any depth works (RabbitMQ takes 1000).
    """
    field = encode_value(leaf)
    for _ in range(depth):
        if kind == "A":
            field = b"A" + struct.pack(">I", len(field)) + field
        elif kind == "F":
            pair = b"\x01n" + field
            field = b"F" + struct.pack(">I", len(pair)) + pair
        else:
            raise ValueError(f"nested() builds arrays ('A') or tables ('F'), not {kind!r}")
    return Raw(field)


def encode_table(headers: Mapping[Any, Any]) -> bytes:
    """The whole field table, size prefix included, as it goes on the wire."""
    pairs = b"".join(_key(key) + encode_value(value) for key, value in headers.items())
    return struct.pack(">I", len(pairs)) + pairs


def _key(key: str | bytes) -> bytes:
    raw = key.encode() if isinstance(key, str) else key
    if len(raw) > 255:
        raise ValueError(f"a key has at most 255 bytes: {key!r}")
    return bytes((len(raw),)) + raw


def encode_value(value: Any) -> bytes:
    """One field value, type octet first."""
    if isinstance(value, Raw):
        return value.field
    if isinstance(value, Float32):
        return b"f" + struct.pack(">f", value.value)
    if isinstance(value, (Float64, float)):
        return b"d" + struct.pack(">d", value.value if isinstance(value, Float64) else value)
    if isinstance(value, str):
        raw = value.encode()
        return b"S" + struct.pack(">I", len(raw)) + raw
    if isinstance(value, (bytes, bytearray)):
        return b"x" + struct.pack(">I", len(value)) + bytes(value)
    if isinstance(value, bool):
        return b"t" + bytes((int(value),))
    if isinstance(value, int):
        return b"l" + struct.pack(">q", value)  # struct.error beyond int64: use Raw
    if value is None:
        return b"V"
    if isinstance(value, Decimal):
        sign, digits, exponent = value.as_tuple()
        assert isinstance(exponent, int), value
        unscaled = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
        if exponent > 0:
            unscaled, exponent = unscaled * 10**exponent, 0
        return b"D" + struct.pack(">Bi", -exponent, unscaled)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return b"T" + struct.pack(">Q", int(value.timestamp()))
    if isinstance(value, Mapping):
        return b"F" + encode_table(value)
    if isinstance(value, (list, tuple)):
        items = b"".join(encode_value(item) for item in value)
        return b"A" + struct.pack(">I", len(items)) + items
    raise TypeError(f"no AMQP field for a {type(value).__name__}: wrap it in Raw")


class _RawHeaders(spec.BasicProperties):
    """Properties whose header table goes out as the given bytes."""

    def __init__(self, table: bytes, **properties: Any) -> None:
        super().__init__(**properties)
        self.table = table

    def encode(self) -> list[bytes]:
        # Let pika encode every other property, then splice the table in
        # where the wire format puts it: after content-type and content-encoding.
        encoded = b"".join(super().encode())
        (flags,) = struct.unpack_from(">H", encoded)
        offset = 2
        for flag in (
            spec.BasicProperties.FLAG_CONTENT_TYPE,
            spec.BasicProperties.FLAG_CONTENT_ENCODING,
        ):
            if flags & flag:
                offset += 1 + encoded[offset]
        flags |= spec.BasicProperties.FLAG_HEADERS
        return [struct.pack(">H", flags), encoded[2:offset], self.table, encoded[offset:]]


class Publisher:
    """One confirmed channel to a broker, for publishing hostile messages (see the module docstring)."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        params = pika.URLParameters(url)
        params.connection_attempts = 1
        params.socket_timeout = timeout
        params.stack_timeout = timeout
        params.blocked_connection_timeout = timeout
        params.client_properties = {"connection_name": CONNECTION_NAME}
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def declare(self, queue: str, **arguments: Any) -> None:
        """Declare a durable queue."""
        self.channel.queue_declare(queue, durable=True, arguments=arguments or None)

    def publish(
        self,
        routing_key: str,
        body: bytes = b"",
        *,
        headers: Mapping[Any, Any] | bytes | None = None,
        exchange: str = "",
        mandatory: bool = True,
        **properties: Any,
    ) -> None:
        """Publish one message and wait for the broker's confirm."""
        if headers is None:
            props = pika.BasicProperties(**properties)
        else:
            table = headers if isinstance(headers, bytes) else encode_table(headers)
            props = _RawHeaders(table, **properties)
        self.channel.basic_publish(exchange, routing_key, body, props, mandatory=mandatory)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def publish(url: str, routing_key: str, body: bytes = b"", **kwargs: Any) -> None:
    """Publish one hostile message on a connection of its own (arguments as `Publisher.publish`)."""
    with Publisher(url) as publisher:
        publisher.publish(routing_key, body, **kwargs)
