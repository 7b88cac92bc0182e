"""FrameReader cuts the frames pika would cut, out of reads that end anywhere (no broker)."""

from __future__ import annotations

from typing import Any

import pytest
from pika import exceptions as pika_errors
from pika import frame, spec

from consumer_svc._frames import FrameReader


class FrameSink:
    """Just what FrameReader uses of pika's connection: the byte count and _process_frame."""

    def __init__(self) -> None:
        self.bytes_received = 0
        self.frames: list[tuple[Any, ...]] = []

    def _process_frame(self, value: Any) -> None:
        if isinstance(value, frame.Body):
            self.frames.append(("body", value.channel_number, bytes(value.fragment)))
        elif isinstance(value, frame.Header):
            properties = value.properties
            self.frames.append(
                (
                    "header",
                    value.channel_number,
                    value.body_size,
                    properties.headers,
                    properties.message_id,
                )
            )
        elif isinstance(value, frame.Method):
            self.frames.append(
                ("method", value.channel_number, type(value.method).__name__, vars(value.method))
            )
        else:
            self.frames.append((type(value).__name__,))


def some_frames() -> bytes:
    """Deliveries of bodies from empty to 200,000 bytes, each followed by a heartbeat."""
    pieces: list[bytes] = []
    for tag, size in enumerate((0, 1, 100, 64 * 1024, 3, 200_000, 7), start=1):
        body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
        deliver = spec.Basic.Deliver("ctag", tag, False, "", "q")
        properties = spec.BasicProperties(message_id=f"m{tag}", headers={"n": tag, "s": "x" * tag})
        pieces.append(frame.Method(1, deliver).marshal())
        pieces.append(frame.Header(1, len(body), properties).marshal())
        if body:
            pieces.append(frame.Body(1, body).marshal())
        pieces.append(frame.Heartbeat().marshal())
    return b"".join(pieces)


def pika_decodes(data: bytes) -> FrameSink:
    """What pika's own decoder makes of ``data``, frame by frame."""
    sink, offset = FrameSink(), 0
    while offset < len(data):
        consumed, value = frame.decode_frame(data[offset:])
        assert value is not None
        offset += consumed
        sink.bytes_received += consumed
        sink._process_frame(value)
    return sink


@pytest.mark.parametrize("chunk", [1, 6, 7, 8, 13, 1000, 65_536, 262_144, 10_000_000])
def test_frames_read_in_any_pieces_decode_as_pikas_own_decoder_does(chunk: int) -> None:
    """Reads that end anywhere, inside a frame head or a body, give pika the very same frames."""
    data = some_frames()
    expected = pika_decodes(data)
    sink = FrameSink()
    reader = FrameReader(sink)
    for start in range(0, len(data), chunk):
        reader(data[start : start + chunk])
    assert sink.frames == expected.frames
    assert sink.bytes_received == expected.bytes_received == len(data)


def test_uneven_reads_decode_as_pikas_own_decoder_does() -> None:
    """Reads of ever-changing sizes, a frame's head split over several, give the same frames."""
    data = some_frames()
    expected = pika_decodes(data)
    sink = FrameSink()
    reader = FrameReader(sink)
    sizes = [3, 70_000, 5, 1, 1, 140_000, 2, 9, 65_531]
    start, n = 0, 0
    while start < len(data):
        size = sizes[n % len(sizes)]
        reader(data[start : start + size])
        start, n = start + size, n + 1
    assert sink.frames == expected.frames
    assert sink.bytes_received == len(data)


def test_a_bad_frame_end_is_an_invalid_frame() -> None:
    """A frame whose end marker is wrong is an error, whole in one read or split over two."""
    data = bytearray(frame.Heartbeat().marshal())
    data[-1] = 0
    with pytest.raises(pika_errors.InvalidFrameError):
        FrameReader(FrameSink())(bytes(data))
    body = bytearray(frame.Body(1, b"x" * 1000).marshal())
    body[-1] = 0
    reader = FrameReader(FrameSink())
    reader(bytes(body[:500]))
    with pytest.raises(pika_errors.InvalidFrameError):
        reader(bytes(body[500:]))


def test_a_protocol_header_split_over_reads_is_decoded_by_pika() -> None:
    """The broker's protocol header (its answer to a version it does not speak) still reaches pika."""
    data = frame.ProtocolHeader().marshal()
    sink = FrameSink()
    reader = FrameReader(sink)
    reader(data[:3])
    reader(data[3:])
    assert sink.frames == [("ProtocolHeader",)]
    assert sink.bytes_received == len(data)
