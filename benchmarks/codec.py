"""``python -m benchmarks.codec``: our field-table codec against pika's own, on typical headers.

Times decoding and encoding of a table of five everyday headers (a UUID, a
small int, a short string, a timestamp, a bool), and of the same table as the
content header frame pika decodes for each delivery.
"""

from __future__ import annotations

import argparse
import struct
import timeit
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from pika import data as pika_data
from pika import frame, spec

from consumer_svc import _codec

# pika's own functions, taken before anything installs ours.
PIKA = (
    pika_data.decode_table,
    pika_data.decode_value,
    pika_data.encode_table,
    pika_data.encode_value,
)
OURS = (_codec.decode_table, _codec.decode_value, _codec.encode_table, _codec.encode_value)

HEADERS: dict[str, Any] = {
    "x-request-id": "5f0c2a0e-8d9c-4b5e-9a53-2f6f1c7e9d41",
    "x-attempt": 3,
    "source": "orders-api",
    "x-sent-at": datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc),
    "x-urgent": True,
}


def use(functions: tuple[Any, ...]) -> None:
    (
        pika_data.decode_table,
        pika_data.decode_value,
        pika_data.encode_table,
        pika_data.encode_value,
    ) = functions


def best(call: Callable[[], object], number: int, repeat: int) -> float:
    """Microseconds per call, the best of ``repeat`` runs."""
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codec")
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    pieces: list[bytes] = []
    PIKA[2](pieces, HEADERS)
    table = b"".join(pieces)
    properties = spec.BasicProperties(
        content_type="application/json", delivery_mode=2, message_id="m-1", headers=HEADERS
    )
    payload = struct.pack(">HHQ", spec.Basic.INDEX, 0, 100) + b"".join(properties.encode())
    header = struct.pack(">BHI", spec.FRAME_HEADER, 1, len(payload)) + payload + b"\xce"
    cases: dict[str, Callable[[], object]] = {
        "decode 5 headers": lambda: pika_data.decode_table(table, 0),
        "header frame": lambda: frame.decode_frame(header),
        "encode 5 headers": lambda: pika_data.encode_table([], HEADERS),
    }
    figures: dict[tuple[str, str], float] = {}
    # Interleaved, best of many short runs: a busy machine disturbs both alike.
    for _ in range(args.repeat):
        for name, functions in (("pika 1.4.4", PIKA), ("consumer_svc", OURS)):
            use(functions)
            assert pika_data.decode_table(table, 0)[0] == HEADERS
            for case, call in cases.items():
                took = best(call, args.number, 1)
                figures[name, case] = min(figures.get((name, case), took), took)
    for name in ("pika 1.4.4", "consumer_svc"):
        text = ", ".join(f"{case} {figures[name, case]:.2f} us" for case in cases)
        print(f"{name:>12}: {text}")
    use(PIKA)


if __name__ == "__main__":
    main()
