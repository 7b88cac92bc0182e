"""Log lines: JSON lines with named fields for machines, passwords masked in every format."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure
from waiting import poll_until

from consumer_svc import json_lines
from consumer_svc._log import _Setup, configure

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
