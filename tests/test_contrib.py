"""The files in contrib/ for operators: checked as far as this machine allows."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

UNIT = Path(__file__).parent.parent / "contrib" / "systemd" / "consumer@.service"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the template unit, with its ExecStart pointed at this venv's twistd."""
    twistd = Path(sys.executable).with_name("twistd")
    unit = tmp_path / "consumer@task_queue.service"
    unit.write_text(UNIT.read_text().replace("/opt/consumer_svc/bin/twistd", str(twistd)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_the_unit_does_not_restart_on_configuration_errors() -> None:
    """RestartPreventExitStatus lists the documented configuration exit statuses, a taken health port's included."""
    from consumer_svc import ExitStatus
    from consumer_svc._errors import ListenFailed

    [line] = [
        line
        for line in UNIT.read_text().splitlines()
        if line.startswith("RestartPreventExitStatus=")
    ]
    statuses = {int(value) for value in line.split("=", 1)[1].split()}
    assert ListenFailed.status in statuses
    assert statuses == {
        ExitStatus.CONFIG,
        ExitStatus.HANDLER,
        ExitStatus.ACCESS_REFUSED,
        ExitStatus.TOPOLOGY_MISMATCH,
    }


def test_the_unit_waits_longer_than_the_drain() -> None:
    """TimeoutStopSec leaves room for the default shutdown timeout plus the close."""
    text = UNIT.read_text()
    [line] = [line for line in text.splitlines() if line.startswith("TimeoutStopSec=")]
    assert int(line.split("=")[1]) > 30 + 5
    assert "Type=notify" in text


INIT = Path(__file__).parent.parent / "contrib" / "init.d" / "consumer"


@pytest.mark.skipif(
    shutil.which("start-stop-daemon") is None, reason="start-stop-daemon is not installed"
)
def test_the_init_script_starts_reports_drains_and_restarts(
    rabbit: Any, queue_name: str, tmp_path: Path
) -> None:
    """start detaches a daemon with a pidfile; status sees it; stop drains in-flight messages; restart
    gives a new process; a stale pidfile does not block the start."""
    from amqp_tools import publish
    from waiting import poll_until

    pidfile, logfile, record = (
        tmp_path / "run" / "c.pid",
        tmp_path / "log" / "c.log",
        tmp_path / "record",
    )
    record.touch()
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "QUEUE": queue_name,
        "TWISTD": str(Path(sys.executable).with_name("twistd")),
        "CONFIG": str(tmp_path / "no-such.conf"),
        "PIDFILE": str(pidfile),
        "LOGFILE": str(logfile),
        "AMQP_URL": rabbit.url(),
        "EXTRA_ARGS": "--handler handlers:slow --shutdown-timeout 20",
        "PYTHONPATH": str(Path(__file__).parent),
        "RECORD": str(record),
        "HANDLER_SECONDS": "1",
    }

    def init(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(INIT), action], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90
        )

    pidfile.parent.mkdir()
    pidfile.write_text("999999\n")  # stale: no such process
    assert init("start").returncode == 0
    poll_until(lambda: "Consuming queue" in logfile.read_text(), 30, message="the daemon consuming")
    first = int(pidfile.read_text())
    assert first != 999999
    assert init("status").returncode == 0
    publish(rabbit.url(), queue_name, [b"a", b"b", b"c"])
    poll_until(lambda: record.read_text().count("start ") >= 1, 30, message="a handler running")
    stopped = init("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not pidfile.exists()
    started = {
        line.split()[1] for line in record.read_text().splitlines() if line.startswith("start ")
    }
    done = {line.split()[1] for line in record.read_text().splitlines() if line.startswith("done ")}
    assert started == done  # the drain let every running handler finish
    assert init("status").returncode != 0
    assert init("restart").returncode == 0
    poll_until(
        lambda: pidfile.exists() and int(pidfile.read_text()) != first, 30, message="a new daemon"
    )
    poll_until(
        lambda: logfile.read_text().count("Consuming queue") >= 2, 30, message="consuming again"
    )
    assert init("stop").returncode == 0
    poll_until(
        lambda: rabbit.list_queues()[queue_name].messages_unacknowledged == 0,
        30,
        message="nothing unacked",
    )
