"""`FrameReader`: AMQP frames cut out of each socket read by offset, in pika's place.

`_connection` installs it as pika's ``_on_data_available``; the frames are
pika's own, decoded by pika's own classes.
"""

from __future__ import annotations

import struct
from typing import Any

from pika import exceptions as pika_errors
from pika import frame as pika_frame
from pika import spec

#: Bytes asked of the socket per read. Twisted asks for 64 KiB, less than one 64 KiB
#: message with its frames; each read costs a system call, a pass of pika's decoding
#: and (here) one ack flush, so bigger bodies are cheaper read in bigger pieces.
READ_SIZE = 256 * 1024

_FRAME_HEAD = struct.Struct(">BHL")
_HEAD = _FRAME_HEAD.size  # type, channel, payload size
_FRAME_END = spec.FRAME_END
_METHOD_ID = struct.Struct(">I")
_CONTENT_HEADER = struct.Struct(">HHQ")


class FrameReader:
    """Cuts AMQP frames out of what the socket delivers, and hands each one to pika.

    pika's own loop (``Connection._on_data_available``) appends each read to one
    bytes buffer and cuts every frame off its front, copying the rest of the
    buffer once per frame, and copies each frame's payload once more: a 64 KiB
    body is copied four or five times on its way in. This reader walks the
    read by offset and keeps the tail of an incomplete frame as a view until
    the reads that complete it arrive: a body is copied once, out of the read
    (or out of the reads it spans, joined straight into the body). The frames
    it builds are pika's own, decoded by pika's own classes, and go to pika's
    ``_process_frame`` as before, with ``bytes_received`` counted as pika does
    (its heartbeat checker watches it).
    """

    def __init__(self, impl: Any) -> None:
        self._impl = impl
        #: The start of an incomplete frame: views of the reads it began in.
        self._pending: list[memoryview] = []
        self._pending_size = 0
        #: Bytes that frame needs in all (0 while its size is not known yet).
        self._needed = 0

    def __call__(self, data: bytes) -> None:
        offset = 0
        if self._pending:
            before, needed = self._pending_size, self._needed
            if before + len(data) < (needed or _HEAD):
                self._pending.append(memoryview(data))
                self._pending_size += len(data)
                return
            pending, self._pending, self._pending_size, self._needed = self._pending, [], 0, 0
            if not needed:
                # Not even the frame's size was there: start again on the joined bytes.
                data = b"".join([*pending, data])
            else:
                offset = needed - before  # the bytes of the pending frame in this read
                self._complete(pending, data, offset)
        self._frames(data, offset)

    def _complete(self, pending: list[memoryview], data: bytes, end: int) -> None:
        """The pending frame ends at ``end`` in ``data``: decode it, copying only its own bytes."""
        first = pending[0]
        if len(first) >= _HEAD and first[0] == spec.FRAME_BODY:
            # A body spanning reads is joined straight out of them: its one copy.
            if data[end - 1] != _FRAME_END:
                raise pika_errors.InvalidFrameError("Invalid FRAME_END marker")
            channel, payload = _FRAME_HEAD.unpack_from(first)[1:]
            fragment = b"".join([first[_HEAD:], *pending[1:], memoryview(data)[: end - 1]])
            self._deliver(_HEAD + payload + 1, pika_frame.Body(channel, fragment))
            return
        self._frames(b"".join([*pending, memoryview(data)[:end]]), 0)

    def _frames(self, data: bytes, offset: int) -> None:
        size = len(data)
        while offset < size:
            frame_type = data[offset]
            if frame_type not in _KNOWN_FRAMES:
                # The protocol header (a version mismatch) or garbage: pika's own decoder.
                consumed, header = pika_frame.decode_frame(data[offset:])
                if header is None:
                    self._keep(data, offset, 0)
                    return
                offset += consumed
                self._deliver(consumed, header)
                continue
            if size - offset < _HEAD:
                self._keep(data, offset, 0)
                return
            _, channel, payload = _FRAME_HEAD.unpack_from(data, offset)
            end = offset + _HEAD + payload + 1
            if end > size:
                self._keep(data, offset, end - offset)
                return
            if data[end - 1] != _FRAME_END:
                raise pika_errors.InvalidFrameError("Invalid FRAME_END marker")
            start = offset + _HEAD
            value: Any
            if frame_type == spec.FRAME_BODY:
                value = pika_frame.Body(channel, data[start : end - 1])
            elif frame_type == spec.FRAME_METHOD:
                method = spec.methods[_METHOD_ID.unpack_from(data, start)[0]]()
                method.decode(data[start : end - 1], 4)
                value = pika_frame.Method(channel, method)
            elif frame_type == spec.FRAME_HEADER:
                class_id, _weight, body_size = _CONTENT_HEADER.unpack_from(data, start)
                properties = spec.props[class_id]()
                properties.decode(data[start + 12 : end - 1])
                value = pika_frame.Header(channel, body_size, properties)
            else:
                value = pika_frame.Heartbeat()
            offset = end
            self._deliver(end - start + _HEAD, value)

    def _deliver(self, consumed: int, value: Any) -> None:
        impl = self._impl
        impl.bytes_received += consumed
        impl._process_frame(value)

    def _keep(self, data: bytes, offset: int, needed: int) -> None:
        view = memoryview(data)[offset:]
        self._pending = [view]
        self._pending_size = len(view)
        self._needed = needed


_KNOWN_FRAMES = frozenset(
    {spec.FRAME_METHOD, spec.FRAME_HEADER, spec.FRAME_BODY, spec.FRAME_HEARTBEAT}
)
