"""amqps:// against a throwaway TLS broker node with a CA made here: verified, mutual, and the real cause of failures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from certs import CA
from rabbitmq import RabbitNode, free_port
from service_support import Logs, Recorder, send, settings_for
from waiting import eventually

from consumer_svc._service import State


class TLSBroker:
    def __init__(self, node: RabbitNode, port: int, ca: CA, client: tuple[Path, Path]) -> None:
        self.node, self.port, self.ca, self.client = node, port, ca, client

    def url(self, host: str = "localhost", credentials: str = "guest:guest@") -> str:
        return f"amqps://{credentials}{host}:{self.port}/%2F"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A node with a TLS listener (certificate for localhost), EXTERNAL auth, and a user named like the client certificate."""
    directory = tmp_path_factory.mktemp("tls")
    ca = CA(directory)
    server_cert, server_key = ca.issue("server", "localhost", hosts=("localhost",))
    client = ca.issue("client", "consumer-client", client=True)
    port = free_port()
    node = RabbitNode(
        tmp_path_factory.mktemp("rabbit-tls"),
        config=[
            f"listeners.ssl.default = 127.0.0.1:{port}",
            f"ssl_options.cacertfile = {ca.path}",
            f"ssl_options.certfile = {server_cert}",
            f"ssl_options.keyfile = {server_key}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = false",
            "auth_mechanisms.1 = PLAIN",
            "auth_mechanisms.2 = EXTERNAL",
            "ssl_cert_login_from = common_name",
        ],
        plugins=["rabbitmq_auth_mechanism_ssl"],
    )
    node.start()
    node.add_user("consumer-client", "unused-password")
    node.set_permissions("/", "consumer-client")
    yield TLSBroker(node, port, ca, client)
    node.stop()


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
