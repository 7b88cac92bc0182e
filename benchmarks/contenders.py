"""One contender consumes COUNT messages and prints one JSON line of figures.

Run as ``python -m benchmarks.contenders NAME --url URL --queue Q --count N
--prefetch P --workload W``; each contender runs in a process of its own, so
its CPU time and peak RSS are its own. The clock starts at the first delivery
and stops when the last message's ack has been handed to the client library.
``timer-ceiling`` touches no broker: it runs the ``io`` workload's 10 ms
Deferred waits, PREFETCH at a time, on the same reactor, so its rate is the
most any Twisted consumer of that workload can reach on this machine.
Workloads: ``noop`` (no work), ``io`` (10 ms of non-blocking waiting),
``blocking`` (10 ms of time.sleep in a thread pool of THREADS), ``large`` (no
work; the body size is the publisher's business), ``latency`` (no work; each
body starts with the publisher's clock, and the figures are the delays from
publish to handler start and to ack), ``cpu`` (``--spin`` rounds of pure
Python, about 1 ms; with ``--until-idle`` the contender stops once nothing
came for a second, for several instances sharing one queue).
``pika-twisted-noack`` is pika's Twisted loop with ``auto_ack``: no acks at
all, the most this client stack can consume.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

IO_SECONDS = 0.010
THREADS = 10
#: The publisher's clock (time.monotonic_ns: one clock for every process) opens each body.
STAMP = struct.Struct(">Q")
#: Latency samples from the first part of a run are left out (connection warm-up).
WARM_UP = 0.1


def spin(rounds: int) -> int:
    """Pure Python work: ``rounds`` of it take about 1 ms (calibrated by the benchmark)."""
    total = 0
    for i in range(rounds):
        total += i * i % 7
    return total


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Meter:
    """Counts acks; records the time and CPU at the first delivery and at the last ack."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.acked = 0
        self.started: float | None = None
        self.cpu_start = 0.0
        self.finished: float | None = None
        self.cpu_end = 0.0
        self.samples: list[tuple[float, int]] = []
        #: Latency mode: publish-to-start and publish-to-ack delays, in seconds.
        self.latency = False
        self.to_start: list[float] = []
        self.to_ack: list[float] = []
        #: Work of the ``cpu`` workload per message.
        self.spin = 0
        #: Stop once idle this long instead of at ``count`` (several instances, one queue).
        self.until_idle = 0.0
        self.last_ack = 0.0

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def delivered(self, body: bytes = b"") -> None:
        if self.started is None:
            self.started = time.perf_counter()
            self.cpu_start = self._cpu()
        if self.latency:
            self.to_start.append((time.monotonic_ns() - STAMP.unpack_from(body)[0]) / 1e9)
        elif self.spin:
            spin(self.spin)

    def acked_body(self, body: bytes) -> None:
        """Latency mode: the ack of ``body`` was handed to the client library now."""
        if self.latency:
            self.to_ack.append((time.monotonic_ns() - STAMP.unpack_from(body)[0]) / 1e9)

    def ack(self) -> bool:
        """Count one ack; True once all are in."""
        self.acked += 1
        if self.until_idle:
            self.last_ack = time.perf_counter()
            self.finished = self.last_ack
            self.cpu_end = self._cpu()
            return False
        if self.acked % 50_000 == 0:
            self.samples.append((time.perf_counter(), _rss_kib()))
        if self.acked == self.count:
            self.finished = time.perf_counter()
            self.cpu_end = self._cpu()
            return True
        return False

    def idle(self) -> bool:
        """``until_idle`` mode: something was consumed, and nothing since that long."""
        return bool(self.acked) and time.perf_counter() - self.last_ack > self.until_idle

    def report(self, name: str) -> None:
        assert self.started is not None
        assert self.finished is not None
        figures: dict[str, Any] = {
            "contender": name,
            "messages": self.acked if self.until_idle else self.count,
            "seconds": self.finished - self.started,
            "cpu_seconds": self.cpu_end - self.cpu_start,
            "peak_rss_kib": _peak_rss_kib(),
            "rss_samples": [(round(t - self.started, 3), kib) for t, kib in self.samples],
            # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes.
            "first": self.started,
            "last": self.finished,
        }
        if self.latency:
            for key, values in (("start", self.to_start), ("ack", self.to_ack)):
                kept = values[int(len(values) * WARM_UP) :]
                for label, fraction in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
                    figures[f"{key}_{label}_ms"] = percentile(kept, fraction) * 1000
        print(json.dumps(figures), flush=True)


def _peak_rss_kib() -> int:
    """This process's own high-water mark (ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


# -- consumer_svc, through its real service objects

#: --concurrency of consumer_svc (default: the prefetch, as many handlers at once as the peers run).
CONCURRENCY: int | None = None
#: For the read-size and decoder comparisons (--ablation): consumer_svc's socket read size,
#: and whether to put pika's own frame loop back.
READ_SIZE = 0
PIKA_DECODER = False


def consumer_svc(
    url: str, queue: str, count: int, prefetch: int, workload: str, meter: Meter
) -> None:
    from twisted.internet import reactor, task

    import consumer_svc as svc
    from consumer_svc import _acks, _frames
    from consumer_svc._service import ConsumerService
    from consumer_svc._settings import Settings
    from consumer_svc._url import parse_url

    handler: Callable[[svc.Message], Any]
    if workload == "io":

        def handler(message: svc.Message) -> Any:
            meter.delivered()
            return task.deferLater(reactor, IO_SECONDS, lambda: None)

    elif workload == "blocking":

        @svc.blocking
        def handler(message: svc.Message) -> Any:
            meter.delivered()
            time.sleep(IO_SECONDS)

    else:

        def handler(message: svc.Message) -> None:
            meter.delivered(message.body)

    if READ_SIZE:
        _frames.READ_SIZE = READ_SIZE
    if PIKA_DECODER:  # pika's own loop over one growing buffer, as before FrameReader

        def pika_loop(impl: Any) -> Any:
            return type(impl)._on_data_available.__get__(impl)

        _frames.FrameReader = pika_loop  # type: ignore[assignment,misc]
    settings = Settings(
        url=parse_url(url),
        queue=queue,
        concurrency=CONCURRENCY or prefetch,
        prefetch=prefetch,
        threads=THREADS,
        heartbeat=60,
    )
    service = ConsumerService(settings, handler, exit=lambda status: None)
    consumer = service.consumer
    count_outcome = consumer.on_outcome  # the real path, metrics included

    def settled(outcome: Any) -> None:
        count_outcome(outcome)
        if meter.ack():
            reactor.callLater(0, stop)  # let the last coalesced ack be flushed first

    def stop() -> None:
        service.stopService().addBoth(lambda _: reactor.stop())

    consumer.on_outcome = settled
    if meter.latency:
        # An ack is handed to pika when the coalesced acks are flushed (end of the read).
        settle, flush, unsent = consumer._settle, _acks.Acks.flush, []

        def settle_timed(delivery: Any, outcome: Any) -> None:
            unsent.append(delivery.message.body)
            settle(delivery, outcome)

        def flush_timed(acks: Any) -> None:
            flush(acks)
            for body in unsent:
                meter.acked_body(body)
            unsent.clear()

        consumer._settle = settle_timed  # type: ignore[method-assign]
        _acks.Acks.flush = flush_timed  # type: ignore[method-assign,assignment]
    if meter.until_idle:

        def check_idle() -> None:
            if meter.idle():
                idle.stop()
                stop()

        idle = task.LoopingCall(check_idle)
        idle.start(0.1, now=False)
    reactor.callWhenRunning(service.startService)
    reactor.run()


# -- no broker: the ceiling of the io workload on this reactor


def timer_ceiling(
    url: str, queue: str, count: int, prefetch: int, workload: str, meter: Meter
) -> None:
    from twisted.internet import reactor, task

    started = 0

    def start_one() -> None:
        nonlocal started
        started += 1
        meter.delivered()
        task.deferLater(reactor, IO_SECONDS, lambda: None).addCallback(finished)

    def finished(_: object) -> None:
        if meter.ack():
            reactor.stop()
        elif started < count:
            start_one()

    def start() -> None:
        for _ in range(min(prefetch, count)):
            start_one()

    reactor.callWhenRunning(start)
    reactor.run()


# -- pika's own Twisted adapter, the loop its documentation shows


def pika_twisted(
    url: str,
    queue: str,
    count: int,
    prefetch: int,
    workload: str,
    meter: Meter,
    auto_ack: bool = False,
) -> None:
    import pika
    from pika.adapters import twisted_connection
    from twisted.internet import defer, protocol, reactor, task, threads

    params = pika.URLParameters(url)

    @defer.inlineCallbacks
    def run(connection: Any) -> Any:
        channel = yield connection.channel()
        yield channel.basic_qos(prefetch_count=prefetch)
        consume, _tag = yield channel.basic_consume(queue=queue, auto_ack=auto_ack)

        def ack(_: object, method: Any, body: bytes = b"") -> None:
            if not auto_ack:
                channel.basic_ack(delivery_tag=method.delivery_tag)
            meter.acked_body(body)
            if meter.ack():
                # A clean close flushes the last acks before the process ends.
                closed = connection.close()
                if closed is None:
                    reactor.stop()
                else:
                    closed.addBoth(lambda _: reactor.stop())

        def handle(received: Any) -> None:
            _ch, method, _props, body = received
            meter.delivered(body)
            if workload == "io":
                task.deferLater(reactor, IO_SECONDS, lambda: None).addCallback(ack, method)
            elif workload == "blocking":
                threads.deferToThread(time.sleep, IO_SECONDS).addCallback(ack, method)
            else:
                ack(None, method, body)
            consume.get().addCallback(handle)

        consume.get().addCallback(handle)

    reactor.suggestThreadPoolSize(THREADS)  # type: ignore[attr-defined]
    cc = protocol.ClientCreator(reactor, twisted_connection.TwistedProtocolConnection, params)
    d = cc.connectTCP(params.host, params.port)
    d.addCallback(lambda conn: conn.ready)
    d.addCallback(run)
    reactor.run()


def pika_twisted_noack(
    url: str, queue: str, count: int, prefetch: int, workload: str, meter: Meter
) -> None:
    """The ceiling of the stack: pika's Twisted loop with auto_ack, no acks at all."""
    pika_twisted(url, queue, count, prefetch, workload, meter, auto_ack=True)


# -- pika SelectConnection


def pika_select(
    url: str, queue: str, count: int, prefetch: int, workload: str, meter: Meter
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import pika

    pool = ThreadPoolExecutor(THREADS)
    state: dict[str, Any] = {}

    def done(channel: Any, tag: int, body: bytes = b"") -> None:
        channel.basic_ack(tag)
        meter.acked_body(body)
        if meter.ack():
            state["connection"].close()

    def on_message(channel: Any, method: Any, properties: Any, body: bytes) -> None:
        meter.delivered(body)
        tag = method.delivery_tag
        if workload == "io":
            state["connection"].ioloop.call_later(IO_SECONDS, lambda: done(channel, tag))
        elif workload == "blocking":

            def work() -> None:
                time.sleep(IO_SECONDS)
                state["connection"].ioloop.add_callback_threadsafe(lambda: done(channel, tag))

            pool.submit(work)
        else:
            done(channel, tag, body)

    def on_channel(channel: Any) -> None:
        channel.basic_qos(
            prefetch_count=prefetch, callback=lambda _: channel.basic_consume(queue, on_message)
        )

    connection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel),
        on_close_callback=lambda conn, reason: conn.ioloop.stop(),
    )
    state["connection"] = connection
    connection.ioloop.start()
    pool.shutdown()


# -- aio-pika


def aio_pika(url: str, queue: str, count: int, prefetch: int, workload: str, meter: Meter) -> None:
    import asyncio

    import aio_pika as aio

    async def main() -> None:
        connection = await aio.connect_robust(url)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        q = await channel.declare_queue(queue, passive=True)
        finished = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def on_message(message: Any) -> None:
            meter.delivered(message.body)
            if workload == "io":
                await asyncio.sleep(IO_SECONDS)
            elif workload == "blocking":
                await loop.run_in_executor(None, time.sleep, IO_SECONDS)
            await message.ack()
            meter.acked_body(message.body)
            if meter.ack():
                finished.set()

        from concurrent.futures import ThreadPoolExecutor

        loop.set_default_executor(ThreadPoolExecutor(THREADS))
        await q.consume(on_message)
        await finished.wait()
        await connection.close()

    asyncio.run(main())


# -- kombu


def kombu(url: str, queue: str, count: int, prefetch: int, workload: str, meter: Meter) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from kombu.connection import Connection
    from kombu.entity import Queue

    pool = ThreadPoolExecutor(THREADS)
    pending: list[Any] = []
    lock = threading.Lock()

    with Connection(url) as connection:
        q = Queue(queue, durable=True, no_declare=True)

        def on_message(body: Any, message: Any) -> None:
            meter.delivered(message.body)
            if workload == "blocking":
                # kombu's channel is not thread-safe: ack from the consuming thread.
                def work() -> None:
                    time.sleep(IO_SECONDS)
                    with lock:
                        pending.append(message)

                pool.submit(work)
                return
            if workload == "io":
                time.sleep(IO_SECONDS)  # kombu has no event loop of its own to wait on
            message.ack()
            meter.acked_body(message.body)
            meter.ack()

        with connection.Consumer(q, callbacks=[on_message], accept=None, prefetch_count=prefetch):
            while meter.acked < count:
                try:
                    connection.drain_events(timeout=0.01)
                except TimeoutError:
                    pass
                except OSError as e:
                    if "timed out" not in str(e):
                        raise
                with lock:
                    ready, pending[:] = list(pending), []
                for message in ready:
                    message.ack()
                    meter.ack()
    pool.shutdown()


CONTENDERS = {
    "consumer_svc": consumer_svc,
    "pika-twisted": pika_twisted,
    "pika-twisted-noack": pika_twisted_noack,
    "pika-select": pika_select,
    "aio-pika": aio_pika,
    "kombu": kombu,
    "timer-ceiling": timer_ceiling,
}

REACTORS = {
    "epoll": "twisted.internet.epollreactor",
    "select": "twisted.internet.selectreactor",
    "poll": "twisted.internet.pollreactor",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.contenders")
    parser.add_argument("name", choices=sorted(CONTENDERS))
    parser.add_argument("--url", default="")
    parser.add_argument("--queue", default="")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument(
        "--workload",
        choices=["noop", "io", "blocking", "large", "latency", "cpu"],
        default="noop",
    )
    parser.add_argument("--concurrency", type=int, help="consumer_svc's (default: the prefetch)")
    parser.add_argument("--read-size", type=int, default=0, help="consumer_svc's socket reads")
    parser.add_argument(
        "--pika-decoder", action="store_true", help="consumer_svc with pika's own frame loop"
    )
    parser.add_argument("--spin", type=int, default=0, help="cpu workload: rounds of work")
    parser.add_argument(
        "--until-idle", type=float, default=0.0, help="stop once idle this many seconds"
    )
    parser.add_argument(
        "--reactor", choices=sorted(REACTORS), default="epoll", help="for the Twisted contenders"
    )
    parser.add_argument("--cpu", type=int, help="run on this CPU only")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.name in ("consumer_svc", "pika-twisted", "pika-twisted-noack", "timer-ceiling"):
        importlib.import_module(REACTORS[args.reactor]).install()
    global CONCURRENCY, READ_SIZE, PIKA_DECODER
    CONCURRENCY, READ_SIZE, PIKA_DECODER = args.concurrency, args.read_size, args.pika_decoder
    meter = Meter(args.count)
    meter.latency = args.workload == "latency"
    meter.spin = args.spin if args.workload == "cpu" else 0
    meter.until_idle = args.until_idle
    CONTENDERS[args.name](args.url, args.queue, args.count, args.prefetch, args.workload, meter)
    meter.report(args.name)


if __name__ == "__main__":
    main()
