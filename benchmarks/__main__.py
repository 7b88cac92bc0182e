"""``python -m benchmarks``: every contender against one throwaway broker, side by side.

Runs alternate between contenders and repeat; the table shows medians, the
spread (min-max) and ratios to pika's raw Twisted loop, measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pika

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from rabbitmq import RabbitNode  # noqa: E402

from .contenders import IO_SECONDS, THREADS  # noqa: E402

CONTENDERS = ["consumer_svc", "pika-twisted", "pika-select", "aio-pika", "kombu"]
WORKLOADS = {
    # name: (body bytes, prefetch, description)
    "noop": (100, 100, "(a) no-op handler, 100-byte bodies, prefetch 100"),
    "io": (
        100,
        100,
        f"(b) {IO_SECONDS * 1000:g} ms non-blocking wait, prefetch 100 (bound {100 / IO_SECONDS:,.0f} msg/s)",
    ),
    "blocking": (
        100,
        100,
        f"(c) {IO_SECONDS * 1000:g} ms blocking in {THREADS} threads (bound {THREADS / IO_SECONDS:,.0f} msg/s)",
    ),
    "large": (64 * 1024, 100, "(d) no-op handler, 64 KiB bodies, prefetch 100"),
}


def fill(node: RabbitNode, queue: str, count: int, size: int) -> None:
    """Fill ``queue`` with ``count`` transient messages (publishing is not what is measured)."""
    connection = pika.BlockingConnection(pika.URLParameters(node.url()))
    channel = connection.channel()
    channel.queue_delete(queue)
    channel.queue_declare(queue, durable=True)
    body = b"x" * size
    properties = pika.BasicProperties(delivery_mode=1)
    for i in range(count):
        channel.basic_publish("", queue, body, properties)
        if i % 10_000 == 9_999:
            connection.process_data_events(0)  # let the broker push back
    connection.close()
    deadline = time.monotonic() + 300
    while True:  # without confirms, count what arrived
        stats = node.list_queues().get(queue)
        if stats is not None and stats.messages_ready == count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"filling {queue}: {stats} after 300 s, expected {count}")
        time.sleep(0.2)


#: msg/s no consumer can exceed: prefetch / latency and threads / latency.
BOUNDS = {"io": 100 / IO_SECONDS, "blocking": THREADS / IO_SECONDS}

#: Not a consumer: the io workload's waits alone, without a broker (contenders.py).
CEILING = "timer-ceiling"


def run_one(
    node: RabbitNode, name: str, workload: str, count: int, options: argparse.Namespace
) -> dict[str, float]:
    size, prefetch, _ = WORKLOADS[workload]
    queue = f"bench-{workload}"
    if name != CEILING:
        fill(node, queue, count, size)
    broker_before = broker_cpu_seconds(node)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.contenders", name, "--url", node.url(), "--queue", queue,
         "--count", str(count), "--prefetch", str(prefetch), "--workload", workload,
         "--reactor", options.reactor, *(["--cpu", "1"] if options.pin else [])],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{name} {workload} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    # Includes the contender's connection set-up and close: a little more than its messages cost.
    result["broker_cpu_seconds"] = broker_cpu_seconds(node) - broker_before
    if name == CEILING:
        return result
    deadline = time.monotonic() + 30
    while True:  # every message acked, nothing left behind
        stats = node.list_queues().get(queue)
        if stats is not None and stats.messages_ready == stats.messages_unacknowledged == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} {workload}: queue not empty afterwards: {stats}")
        time.sleep(0.2)
    return result


def broker_cpu_seconds(node: RabbitNode) -> float:
    """User + system CPU time of the node's processes so far."""
    ticks = 0
    for pid in node.leftover_pids():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def pin_broker(node: RabbitNode) -> None:
    """Every thread of the node's processes onto CPU 0 (the contenders get CPU 1)."""
    for pid in node.leftover_pids():
        with contextlib.suppress(OSError):  # a process or thread that ended meanwhile
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), {0})


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import aio_pika
    import kombu

    import twisted

    return (
        f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}; pika {pika.__version__}, "
        f"Twisted {twisted.__version__}, aio-pika {aio_pika.__version__}, kombu {kombu.__version__}; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--count", type=int, default=20_000, help="messages per run (noop, large)")
    parser.add_argument(
        "--io-count", type=int, default=10_000, help="messages per run (io, blocking)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", default="noop,io,blocking,large")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--long",
        type=int,
        default=0,
        help="also consume this many messages with consumer_svc and report RSS over time (e.g. 1000000)",
    )
    parser.add_argument(
        "--reactor",
        choices=["epoll", "select", "poll"],
        default="epoll",
        help="the reactor of the Twisted contenders (twistd's default on Linux is epoll)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="broker on CPU 0, contenders on CPU 1: shows which side sets the pace",
    )
    args = parser.parse_args()
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs two CPUs")
    contenders = args.contenders.split(",")
    print(f"# consumer_svc benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}\n# {machine()}")
    base = tempfile.mkdtemp(prefix="bench-rabbit-")
    try:
        with RabbitNode(base) as node:
            node.start()
            if args.pin:
                pin_broker(node)
            print(
                f"# RabbitMQ node {node.nodename} on 127.0.0.1:{node.amqp_port}; Twisted reactor: "
                f"{args.reactor}; {'broker on CPU 0, contenders on CPU 1' if args.pin else 'not pinned'}\n"
            )
            for workload in args.workloads.split(","):
                count = args.io_count if workload in ("io", "blocking") else args.count
                names = contenders + ([CEILING] if workload == "io" else [])
                results: dict[str, list[dict[str, float]]] = {c: [] for c in names}
                for rep in range(args.repeat):
                    order = names[rep % len(names) :] + names[: rep % len(names)]
                    for name in order:
                        results[name].append(run_one(node, name, workload, count, args))
                print(f"## {WORKLOADS[workload][2]}, {count:,} messages, {args.repeat} runs each\n")
                bound = BOUNDS.get(workload)
                print(
                    "| contender | msg/s (median) | spread | CPU s / 10k msgs | broker CPU s / 10k | peak RSS MiB | vs pika-twisted msg/s |"
                    + (" of the bound |" if bound else "")
                )
                print("|---|---|---|---|---|---|---|" + ("---|" if bound else ""))
                base = (
                    statistics.median(
                        r["messages"] / r["seconds"] for r in results.get("pika-twisted", [])
                    )
                    if results.get("pika-twisted")
                    else None
                )
                for name in names:
                    rates = [r["messages"] / r["seconds"] for r in results[name]]
                    cpu = statistics.median(
                        r["cpu_seconds"] / r["messages"] * 10_000 for r in results[name]
                    )
                    broker = statistics.median(
                        r["broker_cpu_seconds"] / r["messages"] * 10_000 for r in results[name]
                    )
                    rss = max(r["peak_rss_kib"] for r in results[name]) / 1024
                    median = statistics.median(rates)
                    ratio = f"{median / base:.2f}x" if base else "-"
                    print(
                        f"| {name} | {median:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | {cpu:.2f} | {broker:.2f} | {rss:.0f} | {ratio} |"
                        + (f" {median / bound:.1%} |" if bound else "")
                    )
                print(flush=True)
            if args.long:
                print(f"## (e) consumer_svc, {args.long:,} no-op messages: RSS over time\n")
                result = run_one(node, "consumer_svc", "noop", args.long, args)
                samples = result["rss_samples"]
                for t, kib in samples:
                    print(f"    {t:8.1f} s  {kib / 1024:7.1f} MiB")
                if len(samples) >= 3:
                    half = samples[len(samples) // 3 :]
                    slope = statistics.linear_regression(
                        [t for t, _ in half], [k for _, k in half]
                    ).slope
                    print(
                        f"\n    RSS slope over the last two thirds: {slope:+.2f} KiB/s; {result['messages'] / result['seconds']:,.0f} msg/s\n"
                    )

    finally:
        shutil.rmtree(base, ignore_errors=True)  # the node's data and logs


if __name__ == "__main__":
    main()
