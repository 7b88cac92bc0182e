"""TLS options checked at start, without a broker: refused with exit 64, the file named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.certs import CA

from consumer_svc import ExitStatus
from consumer_svc.tap import Options


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
