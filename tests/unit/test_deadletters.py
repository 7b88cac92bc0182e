"""`python -m consumer_svc dead-letters` without a broker: bad input refused in one line, what a
listing escapes, what a replayed copy is stripped of, and how the tool logs in.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pika
import pytest
from support.certs import CA
from support.dead_letters import dead_letters, tool

from consumer_svc import _deadletters
from consumer_svc.testing.rabbitmq import free_port


@pytest.mark.parametrize(
    ("option", "content", "error"),
    [
        ("--tls-ca", None, "--tls-ca {path!r} cannot be read: No such file or directory"),
        ("--tls-ca", "not a certificate\n", "--tls-ca {path!r} holds no usable CA certificate"),
        ("--tls-cert", "not a certificate\n", "--tls-cert {path!r} holds no certificate (PEM)"),
        ("--tls-key", "not a key\n", "--tls-key {path!r} is not a usable private key"),
    ],
)
def test_a_bad_tls_file_exits_64_naming_it(
    tmp_path: Path, option: str, content: str | None, error: str
) -> None:
    """A missing or unusable TLS file is refused at start, before connecting: exit 64, one line naming the file."""
    ca = CA(tmp_path)
    cert, key = ca.issue("client", "consumer-client", client=True)
    files = {"--tls-ca": ca.path, "--tls-cert": cert, "--tls-key": key}
    bad = tmp_path / f"bad{option}.pem"
    if content is not None:
        bad.write_text(content)
    files[option] = bad
    port = free_port()  # nothing listens: a connection attempt would exit 69, not 64
    tls_args = [part for name, path in files.items() for part in (name, str(path))]

    result = tool(
        tmp_path, "--url", f"amqps://localhost:{port}/", *tls_args, "--queue", "q", "list"
    )

    assert result.returncode == 64, result.stderr
    assert result.stderr.count("\n") == 1
    assert error.format(path=str(bad)) in result.stderr


def test_a_replayed_copy_drops_bcc_and_keeps_the_tools_own_user_id() -> None:
    """BCC (which the broker never delivers, so no parked message shows it) is stripped too, and a user_id naming the tool's own user stays."""
    original = pika.BasicProperties(
        user_id="guest", headers={"BCC": ["x"], "x-last-death-reason": "expired", "k": 1}
    )

    copy = _deadletters.replay_copy(original, username="guest")

    assert copy.user_id == "guest"
    assert copy.headers == {"k": 1, "consumer-svc-stripped": "BCC, x-last-death-reason"}
    assert original.headers["BCC"] == ["x"]  # the original is left as it was


def test_an_unreachable_broker_exits_69(tmp_path: Path) -> None:
    """Nothing listening on the port: exit 69 with one line naming host:port and why, no traceback."""
    port = free_port()

    result = dead_letters(tmp_path, f"amqp://guest:guest@127.0.0.1:{port}/", "--queue", "q", "list")

    assert result.returncode == 69
    assert result.stderr == (
        f"consumer_svc dead-letters: error: cannot reach 127.0.0.1:{port}: connection refused\n"
    )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ("--url", "http://guest:s3cret@127.0.0.1/", "--queue", "q", "list"),
            "--url must start with amqp:// or amqps://, got 'http://guest:***@127.0.0.1/'",
        ),
        (
            ("--queue", "q", "replay", "--count", "0"),
            "--count must be a whole number of at least 1",
        ),
        (
            ("--queue", "q", "list", "--limit", "many"),
            "--limit must be a whole number of at least 1",
        ),
        (("list",), "no queue given: use --queue NAME, CONSUMER_QUEUE, or queue = NAME"),
    ],
)
def test_bad_arguments_exit_64_in_one_line(
    tmp_path: Path, args: tuple[str, ...], error: str
) -> None:
    """A bad argument or URL exits 64 before connecting, in one line that masks any password."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "CONSUMER_"))}
    result = subprocess.run(
        [sys.executable, "-m", "consumer_svc", "dead-letters", *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip

    assert result.returncode == 64
    assert result.stderr.count("\n") == 1
    assert error in result.stderr
    assert "s3cret" not in result.stderr


def test_escape_shows_every_control_and_undecodable_byte() -> None:
    """ESC, CR, BEL, a C1 control, a bidi override, a backslash and bytes that are not UTF-8 all become escapes."""
    hostile = "\x1b]0;owned\x07\x1b[2J\r\x9b31m\u202eevil\u2066\\ ok é"

    assert _deadletters.escape(hostile) == (
        "\\x1b]0;owned\\x07\\x1b[2J\\r\\x9b31m\\u202eevil\\u2066\\\\ ok é"
    )
    assert _deadletters.escape(b"\xff\xfekey\xc3\xa9") == "\\xff\\xfekeyé"


def test_headers_that_cannot_be_read_are_named_in_one_line() -> None:
    """The codec's UndecodableHeaders (a table it cannot read) is why a message cannot be replayed."""
    from consumer_svc._codec import UndecodableHeaders

    properties = pika.BasicProperties(headers=UndecodableHeaders("the table ends mid-value"))
    assert _deadletters.unreadable(properties) == (
        "its headers cannot be decoded (the table ends mid-value)"
    )
    assert _deadletters.unreadable(pika.BasicProperties(headers={"a": 1})) is None


def test_the_command_line_installs_no_reactor(tmp_path: Path) -> None:
    """Importing `python -m consumer_svc`'s module leaves the reactor and pika's Twisted adapter unimported."""
    probe = (
        "import sys, consumer_svc.__main__; "
        "print(sorted({'twisted.internet.reactor', 'pika.adapters.twisted_connection'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=True,
    )  # fmt: skip

    assert result.stdout == "[]\n"


def test_the_tool_logs_in_as_the_service_does() -> None:
    """The tool's parameters are the service's (credentials, vhost, EXTERNAL, product) plus its own transport."""
    from consumer_svc._parameters import connection_parameters as service_parameters
    from consumer_svc._url import parse_url

    for url, certificate in (("amqp://svc:pw@h:5673/jobs", False), ("amqps://h/", True)):
        broker = parse_url(url)
        tool_side = _deadletters.connection_parameters(
            broker, lambda u: pika.SSLOptions(ssl.create_default_context(), u.host),
            client_certificate=certificate,
        )  # fmt: skip
        service_side = service_parameters(broker, name="x", client_certificate=certificate)

        assert type(tool_side.credentials) is type(service_side.credentials)
        assert tool_side.credentials == service_side.credentials
        assert tool_side.virtual_host == service_side.virtual_host == broker.vhost
        assert tool_side.client_properties["product"] == "consumer_svc"
        assert (tool_side.host, tool_side.port) == (broker.host, broker.port)
        assert (tool_side.ssl_options is not None) == broker.tls
        assert tool_side.connection_attempts == 1
