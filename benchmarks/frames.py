"""``python -m benchmarks.frames``: pika's frame loop against consumer_svc's FrameReader.

Decodes the same byte stream of deliveries (Basic.Deliver, content header,
body) cut into reads of a given size, with pika's own
``Connection._on_data_available`` (one buffer, cut once per frame) and with
``consumer_svc._frames.FrameReader``; frames go to a sink that drops them.
CPU time per message, the best of several runs: no broker, no socket.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from pika import frame, spec
from pika.connection import Connection

from consumer_svc._frames import FrameReader


def deliveries(count: int, size: int) -> bytes:
    body = b"x" * size
    properties = spec.BasicProperties(delivery_mode=1)
    pieces: list[bytes] = []
    for tag in range(1, count + 1):
        pieces.append(frame.Method(1, spec.Basic.Deliver("ctag", tag, False, "", "q")).marshal())
        pieces.append(frame.Header(1, size, properties).marshal())
        pieces.append(frame.Body(1, body).marshal())
    return b"".join(pieces)


class Sink:
    bytes_received = 0
    frames_received = 0

    def _process_frame(self, value: Any) -> None:
        pass


class PikaLoop(Sink):
    """pika's own loop, on a sink instead of a connection."""

    _on_data_available = Connection._on_data_available
    _read_frame = Connection._read_frame
    _trim_frame_buffer = Connection._trim_frame_buffer

    def __init__(self) -> None:
        self._frame_buffer = b""


def best(make: Callable[[], Callable[[bytes], None]], reads: list[bytes], repeat: int) -> float:
    fastest = float("inf")
    for _ in range(repeat):
        decode = make()
        started = time.process_time()
        for read in reads:
            decode(read)
        fastest = min(fastest, time.process_time() - started)
    return fastest


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frames")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cases = [(20_000, 100, 6_000), (20_000, 100, 65_536)]
    cases += [(3_000, 65_536, read) for read in (65_536, 262_144, 1_048_576)]
    for count, size, read_size in cases:
        data = deliveries(count, size)
        reads = [data[i : i + read_size] for i in range(0, len(data), read_size)]
        pika_s = best(lambda: PikaLoop()._on_data_available, reads, args.repeat)
        ours_s = best(lambda: FrameReader(Sink()), reads, args.repeat)
        print(
            f"{size:>6,}-byte bodies in {read_size:>9,}-byte reads: pika "
            f"{pika_s / count * 1e6:6.2f} us/message, FrameReader {ours_s / count * 1e6:6.2f}"
        )


if __name__ == "__main__":
    main()
