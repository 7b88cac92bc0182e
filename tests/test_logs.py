"""Log lines: JSON lines with named fields for machines, passwords masked in every format."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure

from consumer_svc import json_lines


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
    twistd = str(Path(sys.executable).with_name("twistd"))
    process = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "--logger", "consumer_svc.json_lines", "consumer", "--queue", "q",
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
