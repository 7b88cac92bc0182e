"""amqps:// against a throwaway TLS broker node with a CA made here: verified, mutual, and the real
cause of failures (the options checked at start: tests/unit/test_tls.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from support.certs import CA, TLSBroker
from support.logs import Logs
from support.service_support import Recorder, send, settings_for
from support.waiting import eventually

from consumer_svc._states import State
from consumer_svc.testing.rabbitmq import RabbitNode


def tls_settings(broker: TLSBroker, queue: str, url: str, **overrides: Any) -> Any:
    settings = settings_for(url, queue, tls_ca=str(broker.ca.path), **overrides)
    return settings


@pytest_twisted.ensureDeferred
async def test_amqps_with_a_verified_broker_certificate(
    tls_broker: TLSBroker, queue_name: str, services: Callable[..., Any]
) -> None:
    """The chain is verified against --tls-ca and the host name against the certificate; messages flow."""
    handler = Recorder()
    run = services(tls_settings(tls_broker, queue_name, tls_broker.url()), handler)
    await run.consuming()
    await send(tls_broker.node, queue_name, [b"over TLS"])
    await eventually(lambda: handler.bodies == [b"over TLS"], timeout=10, what="a message over TLS")


@pytest_twisted.ensureDeferred
async def test_bodies_larger_than_a_tls_record_arrive_intact(
    tls_broker: TLSBroker, queue_name: str, services: Callable[..., Any]
) -> None:
    """Bodies decrypted in pieces of 32 KiB, across frames and reads, arrive byte for byte."""
    handler = Recorder()
    run = services(tls_settings(tls_broker, queue_name, tls_broker.url()), handler)
    await run.consuming()
    bodies = [bytes([n]) * size for n, size in enumerate([1, 40_000, 65_536, 300_001, 3])]
    await send(tls_broker.node, queue_name, bodies)
    await eventually(lambda: len(handler.bodies) == len(bodies), timeout=20, what="every body")
    assert sorted(handler.bodies) == sorted(bodies)


@pytest_twisted.ensureDeferred
async def test_mutual_tls_with_external_authentication(
    tls_broker: TLSBroker, queue_name: str, services: Callable[..., Any]
) -> None:
    """A URL without credentials and a client certificate log in with EXTERNAL as the certificate's user."""
    cert, key = tls_broker.client
    url = tls_broker.url(credentials="")
    handler = Recorder()
    run = services(
        tls_settings(tls_broker, queue_name, url, tls_cert=str(cert), tls_key=str(key)), handler
    )
    await run.consuming()
    connections = tls_broker.node.list_connections()
    assert any(c.user == "consumer-client" for c in connections)


@pytest_twisted.ensureDeferred
async def test_an_untrusted_certificate_is_named_and_retried(
    tls_broker: TLSBroker, queue_name: str, services: Callable[..., Any], logs: Logs, tmp_path: Path
) -> None:
    """A broker certificate from another CA is reported as a TLS failure with its cause, and retried."""
    other = CA(tmp_path, name="another CA")
    run = services(settings_for(tls_broker.url(), queue_name, tls_ca=str(other.path)), Recorder())
    await eventually(lambda: logs.text().count("Reconnecting in") >= 2, timeout=20, what="retries")
    text = logs.text()
    assert "TLS failed" in text
    assert "certificate verify failed" in text
    assert run.exits == []
    assert run.service.state is not State.CONSUMING


@pytest_twisted.ensureDeferred
async def test_a_host_name_mismatch_is_named(
    tls_broker: TLSBroker, queue_name: str, services: Callable[..., Any], logs: Logs
) -> None:
    """Connecting by a name the certificate does not carry fails with a TLS error, and is retried."""
    url = tls_broker.url(host="127.0.0.1")  # the certificate names localhost only
    run = services(tls_settings(tls_broker, queue_name, url), Recorder())
    await eventually(lambda: "Reconnecting in" in logs.text(), timeout=20, what="a retry")
    [lost, *_] = [line for line in logs.lines() if "Could not connect" in line]
    assert "TLS failed" in lost
    assert "127.0.0.1" in lost
    assert run.exits == []


@pytest_twisted.ensureDeferred
async def test_amqps_to_a_plain_port_says_the_port_does_not_speak_tls(
    rabbit: RabbitNode, queue_name: str, services: Callable[..., Any], logs: Logs
) -> None:
    """An amqps:// URL pointing at a plain AMQP port is named as such, not only as "wrong version number"."""
    url = f"amqps://guest:guest@127.0.0.1:{rabbit.amqp_port}/%2F"
    run = services(settings_for(url, queue_name), Recorder())
    await eventually(lambda: "Reconnecting in" in logs.text(), timeout=20, what="a retry")
    [lost, *_] = [line for line in logs.lines() if "Could not connect" in line]
    assert f"127.0.0.1:{rabbit.amqp_port} does not seem to speak TLS" in lost
    assert "plain amqp:// port" in lost
    assert run.exits == []
