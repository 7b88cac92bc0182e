"""The field-table codec by value: every AMQP type, floats, clamping, the depth bound, failures."""

from __future__ import annotations

import math
import struct
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pika
import pytest
from pika import exceptions as pika_errors
from pika import frame, spec
from support import hostile
from support.hostile import Float32, Raw, integer, nested, timestamp

from consumer_svc import Message, _codec
from consumer_svc._codec import (
    LATEST,
    MAX_DEPTH,
    TooDeep,
    UndecodableHeaders,
    UnencodableValue,
    decode_table,
    decode_value,
    encodable,
    encode_table,
)


def decode(headers: dict[Any, Any] | bytes) -> dict[str, Any]:
    """Decode a table written by the independent encoder in tests/support/hostile.py."""
    raw = headers if isinstance(headers, bytes) else hostile.encode_table(headers)
    table, end = decode_table(raw, 0)
    assert end == len(raw)
    return table


def encode(headers: dict[Any, Any]) -> bytes:
    pieces: list[bytes] = []
    size = encode_table(pieces, headers)
    raw = b"".join(pieces)
    assert size == len(raw)
    return raw


def round_trip(headers: dict[Any, Any]) -> dict[str, Any]:
    """Decode what we encoded."""
    return decode(encode(headers))


FIELDS = [
    # (a field as RabbitMQ carries it, the value it decodes to)
    (integer("b", -128), -128),
    (integer("B", 255), 255),
    (integer("s", -32768), -32768),
    (integer("u", 65535), 65535),
    (integer("U", -2), -2),
    (integer("I", -(2**31)), -(2**31)),
    (integer("i", 2**32 - 1), 2**32 - 1),
    (integer("l", hostile.INT64_MIN), hostile.INT64_MIN),
    (integer("L", hostile.INT64_MAX), hostile.INT64_MAX),
    (Float32(1.5), 1.5),
    (0.1, 0.1),
    (Decimal("-3.14"), Decimal("-3.14")),
    (Decimal("12E+3"), Decimal(12000)),
    ("naïve", "naïve"),
    (b"\x00\xff", b"\x00\xff"),
    ([1, "two", [None]], [1, "two", [None]]),
    (
        datetime(2026, 12, 1, 12, 30, tzinfo=timezone.utc),
        datetime(2026, 12, 1, 12, 30, tzinfo=timezone.utc),
    ),
    ({"inner": {"deeper": True}}, {"inner": {"deeper": True}}),
    (None, None),
    (True, True),
    (False, False),
]


@pytest.mark.parametrize(("field", "expected"), FIELDS, ids=lambda v: repr(v)[:30])
def test_every_field_type_decodes_and_survives_a_round_trip(field: Any, expected: Any) -> None:
    """Each AMQP field type decodes to its Python value, which encodes and decodes to the same value."""
    decoded = decode({"k": field})["k"]
    assert decoded == expected
    assert type(decoded) is type(expected)
    again = round_trip({"k": decoded})["k"]
    assert again == expected
    assert type(again) is type(expected)


def test_floats_stay_floats() -> None:
    """'f' and 'd' decode as floats (pika made ints of them), and a float encodes as 'd'."""
    headers = decode({"f": Float32(0.5), "d": 2.75, "whole": 3.0})
    assert headers == {"f": 0.5, "d": 2.75, "whole": 3.0}
    assert all(type(v) is float for v in headers.values())
    assert encode({"d": 2.75}) == hostile.encode_table({"d": 2.75})


def test_pika_itself_uses_the_codec_once_installed() -> None:
    """After install() (run by importing _connection), pika's properties decode and encode floats."""
    import consumer_svc._connection  # noqa: F401  (the import installs the codec)

    _codec.install()  # again: harmless
    assert _codec.installed()
    encoded = b"".join(pika.BasicProperties(headers={"ratio": 0.25}).encode())
    properties = spec.BasicProperties().decode(encoded)
    assert properties.headers == {"ratio": 0.25}
    assert type(properties.headers["ratio"]) is float


def test_a_timestamp_past_year_9999_is_clamped() -> None:
    """A timestamp datetime cannot hold becomes LATEST (datetime.max in UTC, to the second), which round-trips."""
    headers = decode(
        {"far": timestamp(2**63), "farthest": timestamp(2**64 - 1), "last": timestamp(253402300799)}
    )
    assert headers["far"] == headers["farthest"] == LATEST
    assert datetime.max.replace(microsecond=0, tzinfo=timezone.utc) == LATEST
    assert headers["last"] == datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
    assert round_trip(headers) == headers


def depth_of(value: Any) -> tuple[int, Any]:
    """How many arrays or tables wrap the innermost value, and that value."""
    depth = 0
    while isinstance(value, (list, dict)):
        value = value[0] if isinstance(value, list) else value["n"]
        depth += 1
    return depth, value


def test_nesting_up_to_the_bound_decodes_in_full() -> None:
    """Arrays and tables nested MAX_DEPTH deep decode completely, and encode again."""
    headers = decode({"a": nested(MAX_DEPTH, "A", "leaf"), "t": nested(MAX_DEPTH, "F", 7)})
    assert depth_of(headers["a"]) == (MAX_DEPTH, "leaf")
    assert depth_of(headers["t"]) == (MAX_DEPTH, 7)
    assert round_trip(headers) == headers


@pytest.mark.parametrize("kind", ["A", "F"])
def test_nesting_beyond_the_bound_is_skipped_and_marked(kind: str) -> None:
    """A value 1000 deep is cut at MAX_DEPTH: a marker string stands in, the headers after it decode."""
    headers = decode({"deep": nested(1000, kind), "after": "still here"})
    depth, marker = depth_of(headers["deep"])
    assert depth == MAX_DEPTH
    assert isinstance(marker, TooDeep)
    assert marker.startswith("<array" if kind == "A" else "<table")
    assert headers["after"] == "still here"
    assert round_trip(headers) == headers  # the marker is a plain string on the wire


def test_text_that_is_not_utf8_comes_back_as_str_and_encodes_to_the_same_bytes() -> None:
    """A non-UTF-8 key or string decodes as str (surrogate escapes), and re-encodes byte for byte."""
    raw = hostile.encode_table({b"\xff\xfekey": Raw(b"S\x00\x00\x00\x02\xc3\x28"), "ok": "fine"})
    headers = decode(raw)
    assert all(isinstance(key, str) for key in headers)
    assert headers["\udcff\udcfekey"] == "\udcc3("
    assert encode(headers) == raw


@pytest.fixture
def installed() -> None:
    """pika's frame decoder with the codec in place (as importing _connection leaves it)."""
    _codec.install()


def header_frame(headers: bytes) -> bytes:
    """A content header frame with content type, headers, delivery mode and message id."""
    flags = (
        spec.BasicProperties.FLAG_CONTENT_TYPE
        | spec.BasicProperties.FLAG_HEADERS
        | spec.BasicProperties.FLAG_DELIVERY_MODE
        | spec.BasicProperties.FLAG_MESSAGE_ID
    )
    payload = (
        struct.pack(">HHQH", spec.Basic.INDEX, 0, 5, flags)
        + b"\x10application/json"
        + headers
        + b"\x02"
        + b"\x05msg-7"
    )
    return struct.pack(">BHI", spec.FRAME_HEADER, 1, len(payload)) + payload + b"\xce"


@pytest.mark.parametrize(
    ("table", "why"),
    [
        (hostile.encode_table({"x": Raw(b"Z")}), "unknown field type b'Z'"),
        (hostile.encode_table({"x": Raw(b"S\x00\x00\x01\x00abc")}), "running past it"),
        (hostile.encode_table({"x": Raw(b"A\x00\x00\x00\x09V")}), "overruns"),
    ],
    ids=["unknown-type", "string-too-long", "array-too-long"],
)
@pytest.mark.usefixtures("installed")
def test_an_undecodable_table_leaves_the_other_properties_intact(table: bytes, why: str) -> None:
    """pika's frame decoder gets an empty UndecodableHeaders saying why; the other properties decode."""
    consumed, decoded = frame.decode_frame(header_frame(table))
    assert consumed == len(header_frame(table))
    assert isinstance(decoded, frame.Header)
    properties = decoded.properties
    assert isinstance(properties.headers, UndecodableHeaders)
    assert properties.headers == {}
    assert why in properties.headers.error
    assert "\n" not in properties.headers.error
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert properties.message_id == "msg-7"


def test_the_handler_sees_undecodable_headers_as_such() -> None:
    """Message.headers hands an UndecodableHeaders through (not a plain empty dict), error and all."""
    headers = UndecodableHeaders("field table of 3 bytes not decoded: unknown field type b'Z'")
    message = Message(
        b"",
        spec.BasicProperties(headers=headers),
        delivery_tag=1,
        routing_key="q",
        exchange="",
        redelivered=False,
    )
    assert message.headers is headers
    assert message.headers.error.startswith("field table of 3 bytes")
    assert (
        Message(
            b"",
            spec.BasicProperties(),
            delivery_tag=2,
            routing_key="q",
            exchange="",
            redelivered=False,
        ).headers
        == {}
    )


@pytest.mark.usefixtures("installed")
def test_a_1000_deep_header_goes_through_pikas_frame_decoder() -> None:
    """The frame that made pika raise (RecursionError) now decodes, with the marker in place."""
    _, decoded = frame.decode_frame(header_frame(hostile.encode_table({"a": nested(1000)})))
    assert depth_of(decoded.properties.headers["a"])[0] == MAX_DEPTH
    assert decoded.properties.message_id == "msg-7"


@pytest.mark.parametrize(
    ("headers", "path", "problem"),
    [
        ({"big": 2**63}, "big", "outside int64"),
        ({"small": -(2**63) - 1}, "small", "outside int64"),
        ({"a": {"b": [1, math.nan]}}, "a.b[1]", "not finite"),
        ({"inf": -math.inf}, "inf", "not finite"),
        ({"set": {1, 2}}, "set", "a set cannot be"),
        ({"old": datetime(1969, 12, 31, tzinfo=timezone.utc)}, "old", "before 1970"),
        ({"d": Decimal("NaN")}, "d", "not a number"),
        ({"d": Decimal("1E-300")}, "d", "255 decimals"),
        ({"k" * 256: 1}, "k" * 256, "at most 255 bytes"),
    ],
)
def test_an_unencodable_value_raises_naming_its_header(
    headers: dict[str, Any], path: str, problem: str
) -> None:
    """Encoding what AMQP or RabbitMQ cannot carry raises UnencodableValue, naming the header."""
    with pytest.raises(UnencodableValue) as raised:
        encode(headers)
    assert _codec.format_path(raised.value.path) == path
    assert problem in str(raised.value)
    assert str(raised.value).startswith(f"header {path}: ")
    assert isinstance(raised.value, pika_errors.UnsupportedAMQPFieldException)


def test_nesting_beyond_the_bound_cannot_be_encoded() -> None:
    """A value nested deeper than MAX_DEPTH (a cycle, say) raises instead of recursing forever."""
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(UnencodableValue, match="nested deeper than 64"):
        encode({"cycle": cycle})


def test_encodable_strips_only_what_cannot_be_encoded_and_names_it() -> None:
    """encodable() returns a publishable copy without the bad values, and their key paths."""
    headers: dict[Any, Any] = {
        "ok": 1,
        "big": 2**64,
        "nested": {"nan": math.nan, "fine": "x", "list": [1, 2**70, 3, {1, 2}]},
        "when": datetime(2026, 1, 1, tzinfo=timezone.utc),
        7: "a key that is not a string",
    }
    copy, removed = encodable(headers)
    assert copy == {
        "ok": 1,
        "nested": {"fine": "x", "list": [1, 3]},
        "when": datetime(2026, 1, 1, tzinfo=timezone.utc),
    }
    assert removed == ["big", "nested.nan", "nested.list[1]", "nested.list[3]", "7"]
    assert headers["big"] == 2**64  # the original is untouched
    assert round_trip(copy) == copy


def test_encodable_keeps_everything_decoded() -> None:
    """Whatever the codec decoded is encodable as it is: nothing is stripped."""
    headers = decode(
        {
            "far": timestamp(2**63),
            "deep": nested(1000, "F"),
            "f": Float32(1.5),
            "x-death": [[None]],
            "CC": ["a", "b"],
            b"\xff": "key not UTF-8",
        }
    )
    copy, removed = encodable(headers)
    assert removed == []
    assert copy == headers
    assert encodable(UndecodableHeaders("bad")) == ({}, [])


def test_decode_value_reads_one_field() -> None:
    """pika's decode_value entry point reads one typed value and returns the offset after it."""
    assert decode_value(b"d" + struct.pack(">d", 0.5) + b"rest", 0) == (0.5, 9)
