"""Health probes and metrics over HTTP without a broker: the figures, and a server that a hostile
client cannot wear down (the probes following a real service: tests/broker/test_health.py).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from support.prometheus import metric
from support.state import aborted
from support.twistd_support import TWISTD
from support.waiting import poll_until
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from consumer_svc._health import (
    CONNECTION_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_REQUEST_HEAD,
    HealthFactory,
    Metrics,
    _ProbeProtocol,
    health_site,
)
from consumer_svc._outcome import Outcome


def test_handler_durations_land_in_cumulative_buckets_and_outcomes_are_counted() -> None:
    """The per-message figures are plain numbers until scraped; the exposition is Prometheus's own."""
    metrics = Metrics(inflight=lambda: 3)
    for seconds in (0.0005, 0.001, 0.002, 0.01, 700.0):  # 0.001 sits on a bound: le="0.001"
        metrics.handled(seconds)
    metrics.settled(Outcome.ACKED)
    metrics.settled(Outcome.ACKED)
    metrics.settled(Outcome.REQUEUED)
    text = metrics.render().decode()
    assert metric(text, 'consumer_handler_seconds_bucket{le="0.001"}') == 2
    assert metric(text, 'consumer_handler_seconds_bucket{le="0.005"}') == 3
    assert metric(text, 'consumer_handler_seconds_bucket{le="0.01"}') == 4
    assert metric(text, 'consumer_handler_seconds_bucket{le="600.0"}') == 4
    assert metric(text, 'consumer_handler_seconds_bucket{le="+Inf"}') == 5
    assert metric(text, "consumer_handler_seconds_count") == 5
    assert metric(text, "consumer_handler_seconds_sum") == 700.0135
    assert metric(text, 'consumer_messages_total{outcome="acked"}') == 2
    assert metric(text, 'consumer_messages_total{outcome="requeued"}') == 1
    assert metric(text, 'consumer_messages_total{outcome="rejected"}') == 0
    assert metric(text, "consumer_inflight") == 3
    assert metric(text, "consumer_last_ack_timestamp_seconds") > 0


# -- the HTTP side, on a Clock and StringTransports


def probes(clock: Clock, **limits: Any) -> HealthFactory:
    factory = health_site(Metrics(inflight=lambda: 0), lambda: (True, "consuming"), clock=clock)
    for name, value in limits.items():
        setattr(factory, name, value)
    return factory


def connect(factory: HealthFactory) -> tuple[_ProbeProtocol, StringTransport]:
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert isinstance(protocol, _ProbeProtocol)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def close(protocol: Protocol) -> None:
    from twisted.internet.error import ConnectionDone

    protocol.connectionLost(Failure(ConnectionDone()))


def test_one_request_one_answer_then_the_connection_closes() -> None:
    """GET /healthz is answered with Connection: close and the server closes; no timer is left."""
    clock = Clock()
    factory = probes(clock)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n" in answer
    assert answer.endswith(b"\r\n\r\nok\n")
    assert transport.disconnecting
    close(protocol)
    assert factory.open == 0
    assert clock.getDelayedCalls() == []


def test_pipelined_requests_get_only_the_first_answer() -> None:
    """Requests sent behind the first are never answered: one request per connection."""
    clock = Clock()
    protocol, transport = connect(probes(clock))
    protocol.dataReceived(b"GET /metrics HTTP/1.1\r\n\r\n" * 1000)
    protocol.dataReceived(b"GET /metrics HTTP/1.1\r\n\r\n" * 1000)
    assert transport.value().count(b"HTTP/1.1 200 OK") == 1
    assert transport.disconnecting


def test_a_request_body_is_refused_unread() -> None:
    """A Content-Length or chunked body gets 413 at once and the body is never buffered."""
    for header in (b"Content-Length: 314572800", b"Transfer-Encoding: chunked"):
        protocol, transport = connect(probes(Clock()))
        protocol.dataReceived(b"POST /healthz HTTP/1.1\r\n" + header + b"\r\n\r\n" + b"x" * 60000)
        assert transport.value().startswith(b"HTTP/1.1 413 ")
        assert transport.disconnecting
        protocol.dataReceived(b"x" * 65536)
        assert protocol._buffer == b""


def test_an_endless_request_head_is_cut_off() -> None:
    """Headers that never end are answered 431 once they pass the head limit."""
    protocol, transport = connect(probes(Clock()))
    protocol.dataReceived(b"GET /healthz HTTP/1.1\r\n")
    for _ in range(MAX_REQUEST_HEAD // 1000 + 1):
        protocol.dataReceived(b"X-Filler: " + b"a" * 990 + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 431 ")
    assert transport.disconnecting


def test_other_paths_and_methods_and_garbage() -> None:
    """An unknown path is 404, a method other than GET/HEAD 405, HEAD has no body, garbage 400."""
    cases = [
        (b"GET /nope HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 "),
        (b"DELETE /healthz HTTP/1.1\r\n\r\n", b"HTTP/1.1 405 "),
        (b"\x16\x03\x01 garbage\r\n\r\n", b"HTTP/1.1 400 "),
        (b"GET /readyz?x=1 HTTP/1.0\r\n\r\n", b"HTTP/1.1 200 "),
    ]
    for request, status in cases:
        protocol, transport = connect(probes(Clock()))
        protocol.dataReceived(request)
        assert transport.value().startswith(status), (request, transport.value())
    protocol, transport = connect(probes(Clock()))
    protocol.dataReceived(b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert transport.value().endswith(
        b"Content-Length: 3\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )


def test_connections_beyond_the_cap_are_closed_at_once() -> None:
    """Past the cap a new connection is aborted as accepted; a freed slot takes the next one."""
    clock = Clock()
    factory = probes(clock, max_connections=2)
    held = [connect(factory) for _ in range(2)]
    protocol, transport = connect(factory)
    assert transport.disconnected
    close(protocol)
    assert factory.open == 2
    close(held[0][0])
    _, transport = connect(factory)
    assert not transport.disconnected
    assert factory.open == 2


def test_idle_and_slow_connections_are_timed_out() -> None:
    """A connection that sends nothing is aborted at the deadline, and its slot is freed."""
    assert CONNECTION_TIMEOUT <= 10
    clock = Clock()
    factory = probes(clock)
    idle, idle_transport = connect(factory)
    clock.advance(CONNECTION_TIMEOUT - 0.1)
    assert not aborted(idle_transport)
    clock.advance(0.2)
    assert aborted(idle_transport)
    close(idle)
    assert factory.open == 0
    assert clock.getDelayedCalls() == []


# -- a real twistd: what a hostile client costs


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return int(response.status)
    except OSError:
        return 0


def test_a_hostile_client_costs_bounded_memory_and_descriptors(tmp_path: Path) -> None:
    """Pipelined requests, a 300 MiB body and 1,100 idle sockets leave memory and descriptors bounded, and /healthz answering."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    port = _free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "CONSUMER_"))}
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "consumer", "--queue", "q", "--url", "amqp://guest:guest@127.0.0.1:1/", "--health-port", str(port)],
        cwd=tmp_path, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sockets: list[socket.socket] = []
    try:
        poll_until(lambda: _healthz(port) == 200, 30, message="the health port answering")
        base_rss, base_fds = _rss_kib(process.pid), _fds(process.pid)
        figures: dict[str, tuple[int, int]] = {}

        # 14 MB of pipelined requests on one connection, never reading the answers.
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            chunk = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
            try:
                while sent < 14_000_000:
                    s.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass  # closed by the server after the first answer
        figures["pipelined"] = (sent, _rss_kib(process.pid) - base_rss)

        # A 300 MiB body: refused at the headers; the rest is never read.
        sent = 0
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /healthz HTTP/1.1\r\nContent-Length: 314572800\r\n\r\n")
            block = b"x" * (1 << 20)
            try:
                while sent < 300 << 20 and time.monotonic() - started < 20:
                    s.sendall(block)
                    sent += len(block)
            except OSError:
                pass
        figures["body"] = (sent, _rss_kib(process.pid) - base_rss)
        links = [os.readlink(fd) for fd in Path(f"/proc/{process.pid}/fd").iterdir()]
        assert not [link for link in links if "(deleted)" in link or "/tmp" in link], links

        # 1,100 idle connections: all but the cap are closed at once.
        for _ in range(1100):
            # One reset by the server before connect() returned was closed at once too.
            with contextlib.suppress(OSError):
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        poll_until(
            lambda: _fds(process.pid) - base_fds <= MAX_CONNECTIONS,
            15,
            message="the server holding at most the cap",
        )
        held = _fds(process.pid) - base_fds
        figures["idle"] = (1100, _rss_kib(process.pid) - base_rss)
        print(f"\nhealth port under abuse (bytes or sockets sent, RSS growth KiB): {figures}; "
              f"descriptors held for 1,100 idle sockets: {held}")  # fmt: skip
        for what, (_, growth) in figures.items():
            assert growth < 32 * 1024, (what, figures)
        assert _healthz(port) == 0  # the cap is full of idle sockets: refused at once, not queued
        for s in sockets:
            s.close()
        sockets.clear()
        poll_until(lambda: _healthz(port) == 200, 15, message="the health port answering again")
        start = time.monotonic()
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        sockets.append(s)
        s.settimeout(CONNECTION_TIMEOUT + 5)
        with contextlib.suppress(ConnectionResetError):  # aborted by the server at its deadline
            assert s.recv(1) == b""
        assert CONNECTION_TIMEOUT - 1 <= time.monotonic() - start < CONNECTION_TIMEOUT + 5
    finally:
        for s in sockets:
            s.close()
        process.kill()
        process.wait(10)
