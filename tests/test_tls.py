"""amqps:// against a throwaway TLS broker node with a CA made here: verified, mutual, and the real cause of failures."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from certs import CA, TLSBroker
from rabbitmq import RabbitNode
from service_support import Logs, Recorder, send, settings_for
from waiting import eventually

from consumer_svc import ExitStatus
from consumer_svc._service import State
from consumer_svc.tap import Options


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


# -- checked at start: refused with exit 64, the file named


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        Options(environ={}).parseOptions(["--queue", "q", *argv])
    assert exited.value.code == ExitStatus.CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


@pytest.mark.parametrize("option", ["--tls-ca", "--tls-cert", "--tls-key"])
def test_tls_options_with_an_amqp_url_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, option: str
) -> None:
    """Any TLS option with a plain amqp:// URL is refused at start instead of connecting in plaintext."""
    ca = CA(tmp_path)
    cert, key = ca.issue("client", "c", client=True)
    files = {"--tls-ca": [str(ca.path)], "--tls-cert": [str(cert)], "--tls-key": [str(key)]}
    argv = [option, *files[option]]
    if option != "--tls-ca":
        argv = ["--tls-cert", str(cert), "--tls-key", str(key)]
    err = refused(capsys, ["--url", "amqp://u:p@broker/", *argv])
    assert "need an amqps:// URL" in err
    assert "amqp://u:***@broker:5672/%2F is amqp://" in err


def test_a_cluster_with_one_plain_url_is_refused_with_tls_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Every URL must be amqps:// when TLS options are given: one plain node would talk in plaintext."""
    ca = CA(tmp_path)
    argv = ["--url", "amqps://a/", "--url", "amqp://b/", "--tls-ca", str(ca.path)]
    assert "amqp://guest:***@b:5672/%2F is amqp://" in refused(capsys, argv)


def test_tls_files_are_checked_at_start(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A missing file, a file that is not PEM, and a key of another certificate are each named at start."""
    ca = CA(tmp_path)
    cert, key = ca.issue("client", "c", client=True)
    _, other_key = ca.issue("other", "o", client=True)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    url = ["--url", "amqps://broker/"]
    err = refused(capsys, [*url, "--tls-ca", str(tmp_path / "missing.pem")])
    assert f"--tls-ca '{tmp_path / 'missing.pem'}' cannot be read: No such file or directory" in err
    err = refused(capsys, [*url, "--tls-ca", str(garbage)])
    assert f"--tls-ca '{garbage}' holds no usable CA certificate (PEM)" in err
    err = refused(capsys, [*url, "--tls-cert", str(garbage), "--tls-key", str(key)])
    assert f"--tls-cert '{garbage}' holds no certificate (PEM)" in err
    err = refused(capsys, [*url, "--tls-cert", str(cert), "--tls-key", str(garbage)])
    assert f"--tls-key '{garbage}' is not a usable private key for --tls-cert '{cert}'" in err
    err = refused(capsys, [*url, "--tls-cert", str(cert), "--tls-key", str(other_key)])
    assert f"--tls-key '{other_key}' is not a usable private key for --tls-cert '{cert}'" in err
    assert "key values mismatch" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_tls_file_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A TLS file the service's user cannot read is named at start."""
    ca = CA(tmp_path)
    ca.path.chmod(0)
    err = refused(capsys, ["--url", "amqps://broker/", "--tls-ca", str(ca.path)])
    assert "cannot be read: Permission denied" in err


def test_good_tls_files_are_accepted(tmp_path: Path) -> None:
    """A CA, a certificate and its own key with an amqps:// URL pass the checks."""
    ca = CA(tmp_path)
    cert, key = ca.issue("client", "c", client=True)
    options = Options(environ={})
    options.parseOptions(
        ["--queue", "q", "--url", "amqps://broker/", "--tls-ca", str(ca.path),
         "--tls-cert", str(cert), "--tls-key", str(key)]
    )  # fmt: skip
    assert options.settings.tls_cert == str(cert)
