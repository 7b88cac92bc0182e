"""A tolerant AMQP field-table codec, installed into pika in place of its own.

RabbitMQ accepts headers that pika 1.4.4 cannot decode: a timestamp past year
9999 or a table nested ~1000 deep raises inside pika's frame decoder, the
connection drops and the message comes back, again and again. pika also
decodes floats as ints (pika issue #599) and cannot encode a float or an int
beyond int64, yet the service republishes copies of failed messages with their
headers. This codec decodes what the broker delivers without raising:

- 'f' and 'd' become floats; every integer type a plain ``int``;
- a timestamp outside datetime's range is clamped to `LATEST` (``datetime.max``
  in UTC to the second; AMQP timestamps are unsigned, so none is too early);
- an array or table nested deeper than `MAX_DEPTH` is skipped by its length
  prefix and replaced by a `TooDeep` marker string;
- strings and keys that are not UTF-8 become ``str`` with surrogate escapes
  (encoded back to the same bytes), not ``bytes``;
- a header table that still cannot be decoded is skipped by its size prefix
  and comes back as an empty `UndecodableHeaders` whose ``error`` says why,
  so the rest of the properties decode and the connection stays up.

Everything it decodes it can encode again. Encoding raises `UnencodableValue`
(naming the header) for what AMQP or RabbitMQ cannot carry: an int outside
int64, a float that is not finite (RabbitMQ 3.10 closes the whole connection
with 541 INTERNAL_ERROR on one), anything nested deeper than `MAX_DEPTH`, an
unknown type. `encodable` strips such values from a copy before a publish.

`install` puts it into ``pika.data``, whose functions ``pika.spec`` looks up
as module attributes at each call.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from pika import data as pika_data
from pika import exceptions as pika_errors

__all__ = [
    "LATEST",
    "MAX_DEPTH",
    "TooDeep",
    "UndecodableHeaders",
    "UnencodableValue",
    "decode_table",
    "decode_value",
    "encodable",
    "encode_table",
    "encode_value",
    "install",
]

#: Arrays and tables nested deeper than this (below the header table) are not decoded.
MAX_DEPTH = 64

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can hold
#: Where a timestamp past year 9999 is clamped to: datetime.max in UTC, to the whole second
#: (timestamps have no fraction, so it encodes and decodes to itself).
LATEST = datetime.max.replace(microsecond=0, tzinfo=timezone.utc)
_EPOCH = datetime(1970, 1, 1)
_SECOND = timedelta(seconds=1)
_UTC = timezone.utc
_fromtimestamp = datetime.fromtimestamp

_u8 = struct.Struct(">B").unpack_from
_i8 = struct.Struct(">b").unpack_from
_u16 = struct.Struct(">H").unpack_from
_i16 = struct.Struct(">h").unpack_from
_u32 = struct.Struct(">I").unpack_from
_i32 = struct.Struct(">i").unpack_from
_u64 = struct.Struct(">Q").unpack_from
_i64 = struct.Struct(">q").unpack_from
_f32 = struct.Struct(">f").unpack_from
_f64 = struct.Struct(">d").unpack_from
_decimal = struct.Struct(">Bi").unpack_from

_pack_size = struct.Struct(">I").pack
_pack_sized = struct.Struct(">cI").pack  # 'S', 'x', 'A': kind and length
_pack_int = struct.Struct(">ci").pack
_pack_long = struct.Struct(">cq").pack
_pack_double = struct.Struct(">cd").pack
_pack_timestamp = struct.Struct(">cQ").pack
_pack_decimal = struct.Struct(">cBi").pack
_TRUE, _FALSE, _VOID, _TABLE = b"t\x01", b"t\x00", b"V", b"F"
_OCTETS = [bytes((n,)) for n in range(256)]  # key lengths


class UndecodableHeaders(dict[str, Any]):
    """A header table that could not be decoded: empty, with ``error`` saying why in one line."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error

    def __repr__(self) -> str:
        return f"UndecodableHeaders({self.error!r})"


class TooDeep(str):
    """Stands in for an array or table nested deeper than `MAX_DEPTH`: a plain string saying so."""

    __slots__ = ()


class UnencodableValue(pika_errors.UnsupportedAMQPFieldException, ValueError):
    """A value that AMQP (or RabbitMQ) cannot carry; the message names the header."""

    def __init__(self, problem: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(problem, path)
        self.problem = problem
        self.path = path

    def inside(self, step: str | int) -> UnencodableValue:
        """The same error, one level further out."""
        return UnencodableValue(self.problem, (step, *self.path))

    def __str__(self) -> str:
        return f"header {format_path(self.path)}: {self.problem}" if self.path else self.problem

    def __repr__(self) -> str:
        return f"UnencodableValue({str(self)!r})"


class _Malformed(ValueError):
    """The bytes are not a well-formed field table."""


def format_path(path: tuple[str | int, ...]) -> str:
    """``("a", "b", 0)`` as ``a.b[0]``."""
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


# -- decoding


def decode_table(encoded: bytes, offset: int) -> tuple[dict[str, Any], int]:
    """pika's ``decode_table``: a top-level table (headers, arguments), never raising for its content."""
    try:
        return _table(encoded, offset, 0)
    except Exception as e:  # whatever the content, the table's size prefix still frames it
        if len(encoded) < offset + 4:
            raise
        (size,) = _u32(encoded, offset)
        end = offset + 4 + size
        if end > len(encoded):
            raise  # not even the frame is whole: nothing to skip to
        why = str(e) if isinstance(e, _Malformed) else f"{type(e).__name__}: {e}"
        why = " ".join(why.split())  # one line, whatever the exception said
        return UndecodableHeaders(f"field table of {size} bytes not decoded: {why}"), end


def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
    """pika's ``decode_value``: one field value (type octet first) at ``offset``."""
    return _value(encoded, offset, 0)


def _table(encoded: bytes, offset: int, depth: int) -> tuple[dict[str, Any], int]:
    (size,) = _u32(encoded, offset)
    offset += 4
    end = offset + size
    if end > len(encoded):
        raise _Malformed(f"a table of {size} bytes at byte {offset - 4} overruns the frame")
    result: dict[str, Any] = {}
    while offset < end:
        length = encoded[offset]
        offset += 1
        key = encoded[offset : offset + length].decode("utf-8", "surrogateescape")
        result[key], offset = _value(encoded, offset + length, depth)
    if offset != end:
        raise _Malformed(f"the table ending at byte {end} has a value running past it")
    return result, offset


def _value(encoded: bytes, offset: int, depth: int) -> tuple[Any, int]:
    # Ordered by how often each type appears in real headers.
    kind = encoded[offset]
    offset += 1
    if kind == 83:  # S: long string
        (length,) = _u32(encoded, offset)
        offset += 4
        end = offset + length
        return encoded[offset:end].decode("utf-8", "surrogateescape"), end
    if kind == 108 or kind == 76:  # l, L: signed 64 bits
        return _i64(encoded, offset)[0], offset + 8
    if kind == 73:  # I: signed 32 bits
        return _i32(encoded, offset)[0], offset + 4
    if kind == 116:  # t: boolean
        return encoded[offset] != 0, offset + 1
    if kind == 70 or kind == 65:  # F: table, A: array
        if depth >= MAX_DEPTH:
            return _too_deep(encoded, offset, kind)
        if kind == 70:
            return _table(encoded, offset, depth + 1)
        return _array(encoded, offset, depth + 1)
    if kind == 84:  # T: timestamp, seconds since the epoch, unsigned
        (seconds,) = _u64(encoded, offset)
        if seconds > _MAX_TIMESTAMP:  # unsigned: only the far end can be out of range
            return LATEST, offset + 8
        return _fromtimestamp(seconds, _UTC), offset + 8
    if kind == 100:  # d: double
        return _f64(encoded, offset)[0], offset + 8
    if kind == 102:  # f: float
        return _f32(encoded, offset)[0], offset + 4
    if kind == 86:  # V: void
        return None, offset
    if kind == 120:  # x: byte array
        (length,) = _u32(encoded, offset)
        offset += 4
        end = offset + length
        return encoded[offset:end], end
    if kind == 98:  # b: signed 8 bits
        return _i8(encoded, offset)[0], offset + 1
    if kind == 66:  # B: unsigned 8 bits
        return _u8(encoded, offset)[0], offset + 1
    if kind == 115 or kind == 85:  # s, U: signed 16 bits (RabbitMQ refuses 'U'; pika reads it)
        return _i16(encoded, offset)[0], offset + 2
    if kind == 117:  # u: unsigned 16 bits
        return _u16(encoded, offset)[0], offset + 2
    if kind == 105:  # i: unsigned 32 bits
        return _u32(encoded, offset)[0], offset + 4
    if kind == 68:  # D: decimal; signed digits, as pika and the Java client read them
        decimals, raw = _decimal(encoded, offset)
        return Decimal(raw).scaleb(-decimals), offset + 5
    raise _Malformed(f"unknown field type {bytes([kind])!r} at byte {offset - 1}")


def _array(encoded: bytes, offset: int, depth: int) -> tuple[list[Any], int]:
    (size,) = _u32(encoded, offset)
    offset += 4
    end = offset + size
    if end > len(encoded):
        raise _Malformed(f"an array of {size} bytes at byte {offset - 4} overruns the frame")
    result = []
    while offset < end:
        value, offset = _value(encoded, offset, depth)
        result.append(value)
    if offset != end:
        raise _Malformed(f"the array ending at byte {end} has a value running past it")
    return result, offset


def _too_deep(encoded: bytes, offset: int, kind: int) -> tuple[TooDeep, int]:
    # Both arrays and tables carry their size: skip the value without recursing into it.
    (size,) = _u32(encoded, offset)
    end = offset + 4 + size
    if end > len(encoded):
        raise _Malformed(f"a nested value of {size} bytes at byte {offset - 1} overruns the frame")
    what = "table" if kind == 70 else "array"
    return TooDeep(f"<{what} nested deeper than {MAX_DEPTH}: {size} bytes skipped>"), end


# -- encoding


def encode_table(pieces: list[bytes], table: Mapping[Any, Any] | None) -> int:
    """pika's ``encode_table``: append the encoded table to ``pieces``, return its size."""
    return _encode_table(pieces, table or {}, 0)


def encode_value(pieces: list[bytes], value: Any) -> int:
    """pika's ``encode_value``: append one encoded field value, return its size."""
    return _encode_value(pieces, value, 0)


def _encode_table(pieces: list[bytes], table: Mapping[Any, Any], depth: int) -> int:
    index = len(pieces)
    pieces.append(b"")  # the size, once known
    size = 0
    for key, value in table.items():
        try:
            size += _encode_key(pieces, key)
            size += _encode_value(pieces, value, depth)
        except UnencodableValue as e:
            raise e.inside(key if isinstance(key, str) else repr(key)) from None
    pieces[index] = _pack_size(size)
    return size + 4


def _encode_key(pieces: list[bytes], key: Any) -> int:
    if isinstance(key, str):
        try:
            raw = key.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as e:
            raise UnencodableValue(f"the key is not encodable as UTF-8: {e.reason}") from None
    elif isinstance(key, bytes):
        raw = key
    else:
        raise UnencodableValue(f"a key must be a str, not {type(key).__name__}")
    if len(raw) > 255:
        raise UnencodableValue(f"a key is at most 255 bytes, this one has {len(raw)}")
    pieces.append(_OCTETS[len(raw)])
    pieces.append(raw)
    return 1 + len(raw)


def _encode_value(pieces: list[bytes], value: Any, depth: int) -> int:
    if isinstance(value, str):
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as e:
            raise UnencodableValue(f"the string is not encodable as UTF-8: {e.reason}") from None
        pieces.append(_pack_sized(b"S", len(raw)))
        pieces.append(raw)
        return 5 + len(raw)
    if isinstance(value, bool):  # before int: bool is an int
        pieces.append(_TRUE if value else _FALSE)
        return 2
    if isinstance(value, int):
        if -2147483648 <= value <= 2147483647:  # 'I' as pika sends it, 'l' beyond
            pieces.append(_pack_int(b"I", value))
            return 5
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise UnencodableValue(f"the int {value} is outside int64, the widest AMQP integer")
        pieces.append(_pack_long(b"l", value))
        return 9
    if isinstance(value, float):
        if not math.isfinite(value):
            # RabbitMQ closes the whole connection (541 INTERNAL_ERROR) on a NaN or infinity.
            raise UnencodableValue(f"the float {value} is not finite; RabbitMQ refuses it")
        pieces.append(_pack_double(b"d", value))
        return 9
    if value is None:
        pieces.append(_VOID)
        return 1
    if isinstance(value, (bytes, bytearray)):
        pieces.append(_pack_sized(b"x", len(value)))
        pieces.append(bytes(value))
        return 5 + len(value)
    if isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            raise UnencodableValue(f"a table nested deeper than {MAX_DEPTH}")
        pieces.append(_TABLE)
        return 1 + _encode_table(pieces, value, depth + 1)
    if isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            raise UnencodableValue(f"an array nested deeper than {MAX_DEPTH}")
        return _encode_array(pieces, value, depth + 1)
    if isinstance(value, datetime):
        return _encode_timestamp(pieces, value)
    if isinstance(value, Decimal):
        return _encode_decimal(pieces, value)
    raise UnencodableValue(f"a {type(value).__name__} cannot be an AMQP field value")


def _encode_array(pieces: list[bytes], values: list[Any] | tuple[Any, ...], depth: int) -> int:
    index = len(pieces)
    pieces.append(b"")  # kind and size, once known
    size = 0
    for i, value in enumerate(values):
        try:
            size += _encode_value(pieces, value, depth)
        except UnencodableValue as e:
            raise e.inside(i) from None
    pieces[index] = _pack_sized(b"A", size)
    return 5 + size


def _encode_timestamp(pieces: list[bytes], value: datetime) -> int:
    # A naive datetime is taken as UTC, as pika does; sub-second digits are dropped.
    offset = value.utcoffset()
    try:
        utc = value.replace(tzinfo=None) - offset if offset else value.replace(tzinfo=None)
    except OverflowError:
        raise UnencodableValue(f"the datetime {value} is outside datetime's range in UTC") from None
    seconds = (utc - _EPOCH) // _SECOND
    if seconds < 0:
        raise UnencodableValue(f"the datetime {value} is before 1970: AMQP timestamps are unsigned")
    pieces.append(_pack_timestamp(b"T", seconds))
    return 9


def _encode_decimal(pieces: list[bytes], value: Decimal) -> int:
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise UnencodableValue(f"the decimal {value} is not a number AMQP can carry")
    raw = int("".join(map(str, digits)) or "0")
    if exponent >= 0:
        raw, decimals = raw * 10**exponent, 0
    else:
        decimals = -exponent
        while decimals and raw % 10 == 0:  # exact: trailing zeros only
            raw //= 10
            decimals -= 1
    if sign:
        raw = -raw
    if decimals > 255 or not -(2**31) <= raw < 2**31:
        raise UnencodableValue(f"the decimal {value} needs more than 255 decimals or 32-bit digits")
    pieces.append(_pack_decimal(b"D", decimals, raw))
    return 6


def encodable(headers: Mapping[Any, Any] | None) -> tuple[dict[Any, Any], list[str]]:
    """A copy of ``headers`` without the values that cannot be encoded, and their key paths.

    The copy is safe to publish. Paths look like ``outer.inner[2]``; an array
    element that is removed shifts the ones after it, its path names its
    original index.
    """
    removed: list[str] = []
    copy = _strip_table(headers or {}, (), 0, removed)
    return copy, removed


def _strip_table(
    table: Mapping[Any, Any], path: tuple[str | int, ...], depth: int, removed: list[str]
) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for key, value in table.items():
        here = (*path, key if isinstance(key, str) else repr(key))
        try:
            _encode_key([], key)
        except UnencodableValue:
            removed.append(format_path(here))
            continue
        kept, ok = _strip_value(value, here, depth, removed)
        if ok:
            result[key] = kept
    return result


def _strip_value(
    value: Any, path: tuple[str | int, ...], depth: int, removed: list[str]
) -> tuple[Any, bool]:
    if isinstance(value, Mapping) and depth < MAX_DEPTH:
        return _strip_table(value, path, depth + 1, removed), True
    if isinstance(value, (list, tuple)) and depth < MAX_DEPTH:
        kept = []
        for i, item in enumerate(value):
            item, ok = _strip_value(item, (*path, i), depth + 1, removed)
            if ok:
                kept.append(item)
        return kept, True
    try:
        _encode_value([], value, depth)
    except UnencodableValue:
        removed.append(format_path(path))
        return None, False
    return value, True


# -- installing


def install() -> None:
    """Make pika encode and decode field tables with this codec (once; calling again is harmless)."""
    pika_data.decode_table = decode_table
    pika_data.decode_value = decode_value
    pika_data.encode_table = encode_table
    pika_data.encode_value = encode_value


def installed() -> bool:
    """Whether pika uses this codec."""
    return pika_data.decode_table is decode_table and pika_data.encode_table is encode_table
