"""Health probes and metrics over HTTP against a real broker: /readyz follows the service, /metrics
counts what happened.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import pytest_twisted
from support.prometheus import metric
from support.service_support import Running, queue_settles, send, settings_for
from support.waiting import eventually, within
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread

from consumer_svc import Message, Reject
from consumer_svc._health import HealthFactory
from consumer_svc.testing.rabbitmq import RabbitNode


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest_twisted.ensureDeferred
async def test_probes_follow_the_service_and_metrics_count_outcomes(
    rabbit: RabbitNode, queue_name: str, services: Any
) -> None:
    """/readyz is 503 until consuming and again while reconnecting; /healthz stays 200; /metrics counts what happened."""

    def handler(message: Message) -> None:
        if message.body == b"poison":
            raise Reject("bad")

    run: Running = services(settings_for(rabbit.url(), queue_name), handler)
    site: HealthFactory = run.service.health_site()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    http = address.port
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
