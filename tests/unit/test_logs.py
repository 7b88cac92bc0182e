"""Log lines: JSON lines with named fields for machines, passwords masked in every format."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.waiting import poll_until
from twisted.logger import Logger, LogPublisher, textFileLogObserver
from twisted.python.failure import Failure

from consumer_svc import json_lines
from consumer_svc._log import _Setup, configure
from consumer_svc._notify import Notifier
from consumer_svc._retry import describe_failure
from consumer_svc._secrets import install, redact
from consumer_svc._url import parse_url

TWISTD = str(Path(sys.executable).with_name("twistd"))
NO_BROKER = ["--queue", "q", "--url", "amqp://guest:s3cret@127.0.0.1:1/"]


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "CONSUMER_"))}


def test_json_lines_carry_the_named_fields() -> None:
    """Each event is one JSON object with time, level, namespace, message and its own fields."""
    out = io.StringIO()
    publisher = LogPublisher(json_lines(out))
    log = Logger(namespace="consumer_svc", observer=publisher)
    log.warn(
        "Lost the connection to {host}:{port}: {cause}",
        host="rabbit",
        port=5672,
        cause="heartbeat timeout",
    )
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "warn"
    assert record["namespace"] == "consumer_svc"
    assert record["message"] == "Lost the connection to rabbit:5672: heartbeat timeout"
    assert (record["host"], record["port"], record["cause"]) == (
        "rabbit",
        5672,
        "heartbeat timeout",
    )
    assert record["time"].endswith("+00:00")


def test_json_lines_mask_passwords_and_keep_tracebacks() -> None:
    """A URL with a password is masked in the message and the fields; a failure brings its traceback."""
    out = io.StringIO()
    log = Logger(namespace="consumer_svc", observer=LogPublisher(json_lines(out)))
    try:
        raise ValueError("boom")
    except ValueError:
        log.failure("Handler failed on {url}", Failure(), url="amqp://svc:s3cret@rabbit/")
    record = json.loads(out.getvalue())
    assert "s3cret" not in out.getvalue()
    assert record["url"] == "amqp://svc:***@rabbit/"
    assert "ValueError: boom" in record["traceback"]


def test_twistd_logs_json_lines_with_the_logger_option(tmp_path: Path) -> None:
    """`twistd --logger consumer_svc.json_lines` makes every line of the service's log JSON."""
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "--logger", "consumer_svc.json_lines", "consumer", "--queue", "q",
         "--url", "amqp://guest:s3cret@127.0.0.1:1/"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = threading.Timer(30, process.kill)  # reading below can never hang the run
    deadline.start()
    try:
        assert process.stdout is not None
        lines: list[str] = []
        for line in process.stdout:
            lines.append(line)
            if "Reconnecting in" in line:
                break
    finally:
        deadline.cancel()
        process.terminate()
        process.wait(30)
    records = [json.loads(line) for line in lines]
    assert any(r["message"].startswith("Could not connect to 127.0.0.1:1") for r in records)
    assert "s3cret" not in "".join(lines)


def test_log_level_drops_lower_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Debug lines are dropped at the default level and kept with --log-level debug; error drops warnings."""
    monkeypatch.setattr(_Setup, "level", _Setup.level)
    for level, kept in (
        ("info", ["info", "warn"]),
        ("debug", ["debug", "info", "warn"]),
        ("error", []),
    ):
        configure(level)
        out = io.StringIO()
        log = Logger(namespace="consumer_svc", observer=LogPublisher(json_lines(out)))
        log.debug("d")
        log.info("i")
        log.warn("w")
        assert [json.loads(line)["level"] for line in out.getvalue().splitlines()] == kept, level


def test_json_lines_reach_the_logfile_in_daemon_mode(tmp_path: Path) -> None:
    """Daemonized with --logger consumer_svc.json_lines, every line lands in --logfile as JSON, to the last one."""
    pidfile, logfile = tmp_path / "c.pid", tmp_path / "c.log"
    started = subprocess.run(
        [TWISTD, "--pidfile", str(pidfile), "--logfile", str(logfile), "--logger", "consumer_svc.json_lines", "consumer", *NO_BROKER],
        cwd=tmp_path, env=_environ(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    poll_until(
        lambda: logfile.exists() and "Could not connect" in logfile.read_text(),
        30,
        message="a line",
    )
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    poll_until(lambda: not Path(f"/proc/{pid}").exists(), 30, message="the daemon gone")
    records = [json.loads(line) for line in logfile.read_text().splitlines()]
    messages = [r["message"] for r in records]
    assert any(m.startswith("Starting: queue 'q'") for m in messages)
    assert "Stopped" in messages
    assert "s3cret" not in logfile.read_text()


@pytest.mark.parametrize("logger", [[], ["--logger", "consumer_svc.json_lines"]])
def test_twistd_log_level_warn_keeps_only_warnings_and_up(
    tmp_path: Path, logger: list[str]
) -> None:
    """`--log-level warn` leaves out the info lines of twistd and of the service, in text and JSON."""
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *logger, "consumer", *NO_BROKER, "--log-level", "warn"],
            cwd=tmp_path, env=_environ(), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            poll_until(
                lambda: log.read_text().count("Could not connect") >= 2, 30, message="warnings"
            )
        finally:
            process.terminate()
            process.wait(30)
    text = log.read_text()
    assert "Could not connect to 127.0.0.1:1" in text
    for info in ("starting up", "Starting: queue", "Connecting to", "Reconnecting in", "Stopped"):
        assert info not in text, info


def test_an_unknown_log_level_is_refused(tmp_path: Path) -> None:
    """A --log-level outside the five names is one line and exit 64."""
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "consumer", *NO_BROKER, "--log-level", "loud"],
        cwd=tmp_path, env=_environ(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 64
    assert result.stderr.strip() == (
        "twistd consumer: error: --log-level must be one of debug, info, warn, error, critical, got 'loud'"
    )


# -- one redaction point


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("amqp://svc:p@ss@rabbit:5672/%2F", "amqp://svc:***@rabbit:5672/%2F"),
        ("see amqps://svc:a@b@c@rabbit/ now", "see amqps://svc:***@rabbit/ now"),
        ("'amqp://svc:p%40ss@rabbit/'", "'amqp://svc:***@rabbit/'"),
        ("amqp://:only-a-password@rabbit", "amqp://:***@rabbit"),
        ("http://u:pw@proxy:3128", "http://u:***@proxy:3128"),
        ("AMQP://U:PW@RABBIT/", "AMQP://U:***@RABBIT/"),
        ("amqp://user@rabbit/ and mail@example.org", "amqp://user@rabbit/ and mail@example.org"),
    ],
)  # fmt: skip
def test_every_url_form_is_masked_whole(text: str, masked: str) -> None:
    """A URL's password is masked whole, a raw "@" in it included; a URL without one is left as it is."""
    assert redact(text) == masked


def redacted_logs() -> tuple[Logger, io.StringIO, io.StringIO]:
    """A logger whose events go through the redaction point, then to a text and a JSON observer."""
    text, out = io.StringIO(), io.StringIO()
    publisher = LogPublisher()
    install(publisher)
    publisher.addObserver(textFileLogObserver(text))
    publisher.addObserver(json_lines(out))
    install(publisher)  # idempotent: still first, once
    return Logger(namespace="consumer_svc", observer=publisher), text, out


def test_a_known_password_is_masked_in_text_and_json_logs_tracebacks_included() -> None:
    """A password the service read from its URL never shows: not in a message, a field, an object or a traceback."""
    parse_url("amqp://svc:Zq9-known-secret@rabbit/")
    log, text, out = redacted_logs()
    try:
        raise ConnectionError("login with Zq9-known-secret refused")
    except ConnectionError as e:
        log.failure("Handler failed: {error} ({why})", Failure(), error=e, why="Zq9-known-secret")
    log.info("a print from a handler: Zq9-known-secret", log_io="Zq9-known-secret")
    written = text.getvalue() + out.getvalue()
    assert "Zq9-known-secret" not in written
    assert "login with *** refused" in text.getvalue()
    assert "Traceback" in text.getvalue()
    assert (
        "ConnectionError: login with *** refused"
        in json.loads(out.getvalue().splitlines()[0])["traceback"]
    )


def test_the_default_guest_password_and_short_ones_stay_readable() -> None:
    """ "guest" (also the user's name) and passwords under four characters are masked only inside URLs."""
    parse_url("amqp://guest:guest@rabbit/")
    parse_url("amqp://svc:abc@rabbit/")
    assert redact("user 'guest' is fine, abc too") == "user 'guest' is fine, abc too"
    assert redact("amqp://svc:abc@rabbit/") == "amqp://svc:***@rabbit/"


def test_failure_descriptions_for_parked_copies_are_masked() -> None:
    """The one-line failure that becomes a parked copy's consumer-svc-failure header masks a known password."""
    parse_url("amqp://svc:Hdr-secret-77@rabbit/")
    reason = describe_failure(
        ValueError("cannot reach amqp://svc:Hdr-secret-77@rabbit/: Hdr-secret-77")
    )
    assert reason == "ValueError: cannot reach amqp://svc:***@rabbit/: ***"


def test_status_lines_to_systemd_are_masked(tmp_path: Path) -> None:
    """A STATUS= line sent to systemd masks a known password."""
    parse_url("amqp://svc:Status-secret-1@rabbit/")
    path = str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(10)
    try:
        Notifier({"NOTIFY_SOCKET": path}).notify(STATUS="Reconnecting: Status-secret-1 refused")
        assert receiver.recv(4096) == b"STATUS=Reconnecting: *** refused"
    finally:
        receiver.close()
