"""``python -m benchmarks.publisher``: publish COUNT messages at a fixed RATE, each stamped.

Each body opens with the publisher's clock (``time.monotonic_ns``, one clock for
every process on the machine), so the consumer can tell how long a message took
from its publish to its handler and to its ack. Publishing is paced against the
clock from the start (not message by message), so a late millisecond is caught
up in the next one; the figure printed is the rate that was really reached.
``--rate 0`` publishes as fast as it can.
"""

from __future__ import annotations

import argparse
import json
import time

import pika

from .contenders import STAMP


def publish(url: str, queue: str, count: int, rate: float, size: int) -> float:
    """Publish; returns the rate reached (msg/s)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    # Binary: kombu would decode a body of no stated encoding as UTF-8.
    properties = pika.BasicProperties(
        delivery_mode=1, content_type="application/data", content_encoding="binary"
    )
    padding = b"x" * max(0, size - STAMP.size)
    started = time.monotonic()
    sent = 0
    while sent < count:
        due = count if rate <= 0 else min(count, int((time.monotonic() - started) * rate) + 1)
        while sent < due:
            channel.basic_publish("", queue, STAMP.pack(time.monotonic_ns()) + padding, properties)
            sent += 1
        ahead = sent / rate - (time.monotonic() - started) if rate > 0 else 0.0
        if ahead > 0:
            time.sleep(ahead)
    took = time.monotonic() - started
    connection.close()
    return count / took


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.publisher")
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="msg/s; 0: flat out")
    parser.add_argument("--size", type=int, default=100)
    args = parser.parse_args()
    reached = publish(args.url, args.queue, args.count, args.rate, args.size)
    print(json.dumps({"published": args.count, "rate": reached}), flush=True)


if __name__ == "__main__":
    main()
