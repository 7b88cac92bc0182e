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
import threading
import time
from pathlib import Path
from typing import Any

import pika

from consumer_svc.testing.rabbitmq import RabbitNode

from .chart import draw
from .contenders import IO_SECONDS, THREADS, spin

ROOT = Path(__file__).resolve().parent.parent

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

#: Not a consumer: the io workload's waits alone, without a broker (contenders.py).
CEILING = "timer-ceiling"
#: pika's Twisted loop with auto_ack: the most this client stack consumes.
NOACK = "pika-twisted-noack"
#: consumer_svc with 100 handlers at once and a prefetch above it: (b)'s configuration.
WIDE = "consumer_svc c100/p200"
#: Display name -> (contender, its extra arguments, prefetch).
VARIANTS: dict[str, tuple[str, list[str], int]] = {
    WIDE: ("consumer_svc", ["--concurrency", "100"], 200),
}
#: --ablation: where (d)'s gain comes from (read size, frame decoder).
ABLATION: dict[str, tuple[str, list[str], int]] = {
    "consumer_svc 64 KiB reads": ("consumer_svc", ["--read-size", "65536"], 100),
    "consumer_svc 1 MiB reads": ("consumer_svc", ["--read-size", "1048576"], 100),
    "consumer_svc pika's decoder": ("consumer_svc", ["--pika-decoder"], 100),
    "consumer_svc pika's decoder, 64 KiB reads": (
        "consumer_svc",
        ["--pika-decoder", "--read-size", "65536"],
        100,
    ),
}
#: Extra rows per workload, after the contenders.
EXTRA = {"noop": [NOACK], "large": [NOACK], "io": [WIDE, CEILING]}
#: kombu's messages in (b): it blocks 10 ms per message, so 10,000 would take 100 s a run.
KOMBU_IO = 1000
#: Fractions of each contender's no-op capacity the latency workload publishes at.
LOADS = (0.5, 0.9)
#: ...and then one rate for every contender: this share of the slowest one's capacity.
SAME_RATE = 0.5
#: Instances of consumer_svc sharing one queue in the cpu workload.
INSTANCES = (1, 2)


def publish(node: RabbitNode, queue: str, count: int, size: int, *, fresh: bool) -> None:
    """Publish ``count`` transient messages as fast as possible; ``fresh``: (re)declare the queue first."""
    connection = pika.BlockingConnection(pika.URLParameters(node.url()))
    channel = connection.channel()
    if fresh:
        channel.queue_delete(queue)
        channel.queue_declare(queue, durable=True)
    body = b"x" * size
    properties = pika.BasicProperties(delivery_mode=1)
    for i in range(count):
        channel.basic_publish("", queue, body, properties)
        if i % 10_000 == 9_999:
            connection.process_data_events(0)  # let the broker push back
    connection.close()


def fill(node: RabbitNode, queue: str, count: int, size: int) -> None:
    """Fill ``queue`` with ``count`` transient messages (publishing is not what is measured)."""
    publish(node, queue, count, size, fresh=True)
    deadline = time.monotonic() + 300
    while True:  # without confirms, count what arrived
        stats = node.list_queues().get(queue)
        if stats is not None and stats.messages_ready == count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"filling {queue}: {stats} after 300 s, expected {count}")
        time.sleep(0.2)


#: msg/s no consumer can exceed: prefetch (or concurrency) / latency and threads / latency.
BOUNDS = {"io": 100 / IO_SECONDS, "blocking": THREADS / IO_SECONDS}


def command(
    node: RabbitNode,
    name: str,
    workload: str,
    queue: str,
    count: int,
    options: argparse.Namespace,
    *,
    prefetch: int = 100,
    extra: list[str] | None = None,
    pin: bool = True,
) -> list[str]:
    """The command line of one contender process; ``name`` may be a variant's display name."""
    contender, more, prefetch = VARIANTS.get(name, (name, [], prefetch))
    return [sys.executable, "-m", "benchmarks.contenders", contender, "--url", node.url(),
            "--queue", queue, "--count", str(count), "--prefetch", str(prefetch),
            "--workload", workload, "--reactor", options.reactor, *more, *(extra or []),
            *(["--cpu", "1"] if options.pin and pin else [])]  # fmt: skip


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def report_of(out: str, what: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{what}: no figures")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_one(
    node: RabbitNode, name: str, workload: str, count: int, options: argparse.Namespace
) -> dict[str, Any]:
    size, prefetch, _ = WORKLOADS[workload]
    queue = f"bench-{workload}"
    if name == "kombu" and workload == "io":
        count = min(count, KOMBU_IO)  # it sleeps: about 100 msg/s, whatever the count
    if name != CEILING:
        fill(node, queue, count, size)
    broker_before = broker_cpu_seconds(node)
    out = subprocess.run(
        command(node, name, workload, queue, count, options, prefetch=prefetch),
        cwd=ROOT, capture_output=True, text=True, timeout=1800, env=ENV,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{name} {workload} failed:\n{out.stderr[-3000:]}")
    result = report_of(out.stdout, f"{name} {workload}")
    # Includes the contender's connection set-up and close: a little more than its messages cost.
    result["broker_cpu_seconds"] = broker_cpu_seconds(node) - broker_before
    if name == CEILING:
        return result
    check_empty(node, queue, f"{name} {workload}")
    return result


def check_empty(node: RabbitNode, queue: str, what: str) -> None:
    deadline = time.monotonic() + 30
    while True:  # every message acked, nothing left behind
        stats = node.list_queues().get(queue)
        if stats is not None and stats.messages_ready == stats.messages_unacknowledged == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: queue not empty afterwards: {stats}")
        time.sleep(0.2)


def wait_for_consumers(
    node: RabbitNode, queue: str, count: int, processes: list[subprocess.Popen[str]]
) -> None:
    deadline = time.monotonic() + 60
    while True:
        stats = node.list_queues().get(queue)
        if stats is not None and stats.consumers >= count:
            return
        for process in processes:
            if process.poll() is not None:
                err = process.communicate()[1]
                raise RuntimeError(f"a contender ended before consuming:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{queue}: {stats} after 60 s, expected {count} consumer(s)")
        time.sleep(0.1)


def finish(process: subprocess.Popen[str], what: str, timeout: float) -> dict[str, Any]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise RuntimeError(f"{what}: still running after {timeout:.0f} s") from None
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{err[-3000:]}")
    return report_of(out, what)


def run_latency(
    node: RabbitNode, name: str, rate: float, options: argparse.Namespace, count: int = 0
) -> dict[str, Any]:
    """Publish at ``rate`` (0: flat out) for --latency-seconds while ``name`` consumes; its delays."""
    queue = "bench-latency"
    count = count or max(1000, min(200_000, int(rate * options.latency_seconds)))
    fill(node, queue, 0, 100)
    process = subprocess.Popen(
        command(node, name, "latency", queue, count, options),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        wait_for_consumers(node, queue, 1, [process])
        published = subprocess.run(
            [sys.executable, "-m", "benchmarks.publisher", "--url", node.url(), "--queue", queue,
             "--count", str(count), "--rate", str(rate)],
            cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV,
        )  # fmt: skip
        if published.returncode != 0:
            raise RuntimeError(f"publisher failed:\n{published.stderr[-3000:]}")
        result = finish(process, f"{name} latency", 600)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    result["offered"] = report_of(published.stdout, "publisher")["rate"]
    check_empty(node, queue, f"{name} latency")
    return result


def calibrate_spin() -> tuple[int, float]:
    """Rounds of `spin` that take 1 ms here (the best of several tries), and what they took."""
    rounds = 20_000
    best = min(timed_spin(rounds) for _ in range(20))
    rounds = int(rounds * 0.001 / best)
    return rounds, min(timed_spin(rounds) for _ in range(20))


def timed_spin(rounds: int) -> float:
    started = time.perf_counter()
    spin(rounds)
    return time.perf_counter() - started


def run_instances(
    node: RabbitNode, instances: int, count: int, rounds: int, options: argparse.Namespace
) -> dict[str, Any]:
    """``instances`` consumer_svc processes (defaults: concurrency 10, prefetch 20) on one queue."""
    queue = "bench-cpu"
    fill(node, queue, 0, 100)
    extra = ["--concurrency", "10", "--spin", str(rounds), "--until-idle", "1.0"]
    argv = command(
        node, "consumer_svc", "cpu", queue, count, options, prefetch=20, extra=extra, pin=False
    )
    processes = [
        subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
        )
        for _ in range(instances)
    ]
    try:
        wait_for_consumers(node, queue, instances, processes)
        publish(node, queue, count, 100, fresh=False)
        results = [finish(p, f"consumer_svc cpu x{instances}", 600) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    check_empty(node, queue, f"consumer_svc cpu x{instances}")
    messages = sum(r["messages"] for r in results)
    if messages != count:
        raise RuntimeError(f"cpu x{instances}: {messages} acked, {count} published")
    first, last = min(r["first"] for r in results), max(r["last"] for r in results)
    return {
        "messages": messages,
        "seconds": last - first,
        "shares": [r["messages"] for r in results],
        "cpu_seconds": sum(r["cpu_seconds"] for r in results),
    }


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


class LoadWatch:
    """Samples the 1-minute load average every ``interval`` s while the benchmark runs.

    The figures count only on a machine that is otherwise quiet: the range printed at the
    end says whether it was.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        return {
            "min": min(self.samples),
            "median": statistics.median(self.samples),
            "max": max(self.samples),
        }


def rate(result: dict[str, Any]) -> float:
    return float(result["messages"] / result["seconds"])


def throughput_table(
    workload: str, count: int, repeat: int, results: dict[str, list[dict[str, Any]]]
) -> dict[str, dict[str, float]]:
    """Print one workload's table; returns its figures by contender."""
    fewer = f" (kombu {min(count, KOMBU_IO):,})" if workload == "io" and "kombu" in results else ""
    print(f"## {WORKLOADS[workload][2]}, {count:,} messages{fewer}, {repeat} runs each\n")
    bound = BOUNDS.get(workload)
    medians = {name: statistics.median(rate(r) for r in runs) for name, runs in results.items()}
    base = medians.get("pika-twisted")
    ceiling = medians.get(CEILING) if workload == "io" else medians.get(NOACK)
    ceiling_label = "of the timer ceiling" if workload == "io" else "of the no-ack ceiling"
    print(
        "| contender | msg/s (median) | spread | CPU s / 10k msgs | broker CPU s / 10k | peak RSS MiB | vs pika-twisted |"
        + (" of the bound |" if bound else "")
        + (f" {ceiling_label} |" if ceiling else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if bound else "") + ("---|" if ceiling else ""))
    figures: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        rates = [rate(r) for r in runs]
        cpu = statistics.median(r["cpu_seconds"] / r["messages"] * 10_000 for r in runs)
        broker = statistics.median(r["broker_cpu_seconds"] / r["messages"] * 10_000 for r in runs)
        rss = max(r["peak_rss_kib"] for r in runs) / 1024
        median = medians[name]
        label = name if name not in (CEILING,) else f"{name} (no broker)"
        print(
            f"| {label} | {median:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | {cpu:.2f} | {broker:.2f} | {rss:.0f} | "
            + (f"{median / base:.2f}x |" if base else "- |")
            + (f" {median / bound:.1%} |" if bound else "")
            + (f" {median / ceiling:.1%} |" if ceiling else "")
        )
        figures[name] = {"median": median, "min": min(rates), "max": max(rates)}
    print(flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--count", type=int, default=20_000, help="messages per run (noop, large)")
    parser.add_argument(
        "--io-count", type=int, default=10_000, help="messages per run (io, blocking)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", default="noop,io,blocking,large,latency,cpu")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=3.0,
        help="latency workload: seconds of publishing per run",
    )
    parser.add_argument(
        "--cpu-count", type=int, default=3000, help="cpu workload: messages per run"
    )
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
    parser.add_argument(
        "--chart",
        default=str(ROOT / "benchmarks" / "results.png"),
        help="write the side-by-side chart here ('' for none)",
    )
    parser.add_argument("--json", default="", help="also write every figure to this file")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="(d) also with consumer_svc's read size and frame decoder changed",
    )
    args = parser.parse_args()
    if args.ablation:
        VARIANTS.update(ABLATION)
        EXTRA["large"] = [*EXTRA["large"], *ABLATION]
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs two CPUs")
    contenders = args.contenders.split(",")
    workloads = args.workloads.split(",")
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    host = machine()
    print(f"# consumer_svc benchmark, {started}\n# {host}")
    summary: dict[str, Any] = {"started": started, "machine": host, "throughput": {}}
    base = tempfile.mkdtemp(prefix="bench-rabbit-")
    watch = LoadWatch()
    try:
        with watch, RabbitNode(base) as node:
            node.start()
            if args.pin:
                pin_broker(node)
            summary["rabbitmq"] = node.version
            print(
                f"# RabbitMQ {node.version}, node {node.nodename} on 127.0.0.1:{node.amqp_port}; "
                f"Twisted reactor: {args.reactor}; "
                f"{'broker on CPU 0, contenders on CPU 1' if args.pin else 'not pinned'}\n"
            )
            for workload in (w for w in workloads if w in WORKLOADS):
                count = args.io_count if workload in ("io", "blocking") else args.count
                names = contenders + [
                    n
                    for n in EXTRA.get(workload, [])
                    if n in (CEILING, NOACK) or VARIANTS[n][0] in contenders
                ]
                results: dict[str, list[dict[str, Any]]] = {c: [] for c in names}
                for rep in range(args.repeat):
                    order = names[rep % len(names) :] + names[: rep % len(names)]
                    for name in order:
                        results[name].append(run_one(node, name, workload, count, args))
                summary["throughput"][workload] = throughput_table(
                    workload, count, args.repeat, results
                )
                print(f"# load average now {os.getloadavg()[0]:.2f}\n", flush=True)
            if "latency" in workloads:
                summary["latency"] = latency(node, contenders, summary, args)
            if "cpu" in workloads:
                summary["scaling"] = scaling(node, args)
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
                        f"\n    RSS slope over the last two thirds: {slope:+.2f} KiB/s; {rate(result):,.0f} msg/s\n"
                    )
    finally:
        shutil.rmtree(base, ignore_errors=True)  # the node's data and logs
    summary["finished"] = time.strftime("%Y-%m-%d %H:%M %Z")
    summary["load_at_end"] = os.getloadavg()[0]
    summary["load"] = load = watch.summary()
    print(
        f"# finished {summary['finished']}, load average {summary['load_at_end']:.2f}; "
        f"during the run (every {watch.interval:g} s): {load['min']:.2f}-{load['max']:.2f}, "
        f"median {load['median']:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.chart:
        draw(summary, Path(args.chart))
        print(f"# chart: {args.chart}")


def latency(
    node: RabbitNode, contenders: list[str], summary: dict[str, Any], args: argparse.Namespace
) -> dict[str, dict[str, dict[str, float]]]:
    """Each contender at 50 % and 90 % of its own capacity, then all at one rate.

    The capacity is the contender's rate while the publisher publishes
    --count messages flat out at the same time (the median of --repeat runs):
    what this machine sustains end to end with that contender, publisher and
    broker sharing its cores.
    """
    capacity: dict[str, float] = {}
    flat_out: dict[str, list[float]] = {c: [] for c in contenders}
    for rep in range(args.repeat):
        for name in contenders[rep % len(contenders) :] + contenders[: rep % len(contenders)]:
            flat_out[name].append(rate(run_latency(node, name, 0, args, count=args.count)))
    print(
        f"## capacity with a live publisher (flat out, {args.count:,} messages, no-op handler, "
        f"100-byte bodies, prefetch 100, {args.repeat} runs each)\n"
    )
    print("| contender | msg/s (median) | spread |")
    print("|---|---|---|")
    for name, rates in flat_out.items():
        capacity[name] = statistics.median(rates)
        print(f"| {name} | {capacity[name]:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} |")
    print()
    figures: dict[str, dict[str, dict[str, float]]] = {}
    # Each at a share of its own capacity; then all at one rate, which the slowest
    # sustains (half its capacity), so that the rows compare at the same offered load.
    slowest = min(capacity.values())
    levels = [
        (f"{load:.0%}", f"{load:.0%} of each contender's capacity", {
            name: capacity[name] * load for name in contenders
        })
        for load in LOADS
    ]  # fmt: skip
    levels.append(
        (
            f"{slowest * SAME_RATE:,.0f} msg/s",
            f"one rate for all, {slowest * SAME_RATE:,.0f} msg/s "
            f"({SAME_RATE:.0%} of the slowest one's capacity)",
            dict.fromkeys(contenders, slowest * SAME_RATE),
        )
    )
    for key, title, offered in levels:
        results: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
        for rep in range(args.repeat):
            order = contenders[rep % len(contenders) :] + contenders[: rep % len(contenders)]
            for name in order:
                results[name].append(run_latency(node, name, offered[name], args))
        print(
            f"## latency at {title}, 100-byte bodies, "
            f"prefetch 100, {args.latency_seconds:g} s of publishing, {args.repeat} runs each "
            f"(median of the runs' percentiles, ms)\n"
        )
        print(
            "| contender | publish rate msg/s (asked / reached) | to handler p50 | p99 | p99.9 | to ack p50 | p99 | p99.9 |"
        )
        print("|---|---|---|---|---|---|---|---|")
        figures[key] = {}
        for name, runs in results.items():
            row = {
                key: statistics.median(r[key] for r in runs)
                for key in runs[0]
                if key.endswith("_ms")
            }
            reached = statistics.median(r["offered"] for r in runs)
            print(
                f"| {name} | {offered[name]:,.0f} / {reached:,.0f} | "
                + " | ".join(
                    f"{row[f'{k}_{p}_ms']:.2f}"
                    for k in ("start", "ack")
                    for p in ("p50", "p99", "p99.9")
                )
                + " |"
            )
            figures[key][name] = {**row, "rate": offered[name], "reached": reached}
        print(f"\n# load average now {os.getloadavg()[0]:.2f}\n", flush=True)
    return figures


def scaling(node: RabbitNode, args: argparse.Namespace) -> dict[str, Any]:
    """consumer_svc with a CPU-bound handler, one instance and two on one queue."""
    rounds, took = calibrate_spin()
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in INSTANCES}
    for rep in range(args.repeat):
        for instances in INSTANCES if rep % 2 == 0 else INSTANCES[::-1]:
            results[instances].append(run_instances(node, instances, args.cpu_count, rounds, args))
    print(
        f"## CPU-bound handler ({rounds:,} rounds of pure Python, {took * 1000:.2f} ms here), "
        f"consumer_svc instances on one queue (concurrency 10, prefetch 20), "
        f"{args.cpu_count:,} messages, {args.repeat} runs each\n"
    )
    print(
        "| instances | msg/s (median) | spread | CPU s / 10k msgs | messages per instance | scaling |"
    )
    print("|---|---|---|---|---|---|")
    medians = {n: statistics.median(rate(r) for r in runs) for n, runs in results.items()}
    for n, runs in results.items():
        rates = [rate(r) for r in runs]
        cpu = statistics.median(r["cpu_seconds"] / r["messages"] * 10_000 for r in runs)
        print(
            f"| {n} | {medians[n]:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | {cpu:.2f} | "
            f"{' / '.join(str(s) for s in runs[-1]['shares'])} | {medians[n] / medians[1]:.2f}x |"
        )
    print(f"\n# load average now {os.getloadavg()[0]:.2f}\n", flush=True)
    return {"rounds": rounds, "ms": took * 1000, "rates": {str(n): m for n, m in medians.items()}}


if __name__ == "__main__":
    main()
