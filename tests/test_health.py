"""Health probes and metrics over HTTP, against a real broker."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import pytest_twisted
from rabbitmq import RabbitNode
from service_support import Running, queue_settles, send, settings_for
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThread
from twisted.web.server import Site
from waiting import eventually, within

from consumer_svc import Message, Reject
from consumer_svc._consumer import Outcome
from consumer_svc._health import Metrics


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or (
            line.startswith(name + "{") and line.split(" ")[0] == name
        ):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


@pytest_twisted.ensureDeferred
async def test_probes_follow_the_service_and_metrics_count_outcomes(
    rabbit: RabbitNode, queue_name: str, services: Any
) -> None:
    """/readyz is 503 until consuming and again while reconnecting; /healthz stays 200; /metrics counts what happened."""

    def handler(message: Message) -> None:
        if message.body == b"poison":
            raise Reject("bad")

    run: Running = services(settings_for(rabbit.url(), queue_name), handler)
    site: Site = run.service.health_site()
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    http = port.getHost().port
    try:
        await run.consuming()
        assert await deferToThread(get, http, "/readyz") == (200, "consuming\n")
        await send(rabbit, queue_name, [b"ok", b"ok", b"poison"])
        await queue_settles(rabbit, queue_name)
        code, text = await deferToThread(get, http, "/metrics")
        assert code == 200
        assert metric(text, 'consumer_messages_total{outcome="acked"}') == 2
        assert metric(text, 'consumer_messages_total{outcome="dead_lettered"}') == 1
        assert metric(text, "consumer_connected") == 1
        assert metric(text, "consumer_connections_total") == 1
        assert metric(text, "consumer_handler_seconds_count") == 3
        assert metric(text, "consumer_last_ack_timestamp_seconds") > 0
        await deferToThread(rabbit.stop_app)
        try:
            await eventually(
                lambda: deferToThread(get, http, "/readyz").addCallback(lambda r: r[0] == 503),
                timeout=15,
                what="not ready",
            )
            code, body = await deferToThread(get, http, "/readyz")
            assert body.strip() in ("waiting to reconnect", "connecting")
            assert await deferToThread(get, http, "/healthz") == (200, "ok\n")
            _, text = await deferToThread(get, http, "/metrics")
            assert metric(text, "consumer_connected") == 0
        finally:
            await deferToThread(rabbit.start_app)
        await run.consuming(timeout=30)
        assert (await deferToThread(get, http, "/readyz"))[0] == 200
    finally:
        await within(10, maybeDeferred(port.stopListening))


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
