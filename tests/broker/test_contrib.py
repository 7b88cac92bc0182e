"""The init script in contrib/ and the shipped tap.conf, run against a real broker, as far as this
machine allows (the systemd unit: tests/unit/test_contrib.py). The check that a stop never kills
a stranger needs root, not a broker, and stays here with the init script's other tests.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import CHECKOUT, TESTS

INIT = CHECKOUT / "contrib" / "init.d" / "consumer"


@pytest.mark.skipif(
    shutil.which("start-stop-daemon") is None, reason="start-stop-daemon is not installed"
)
def test_the_init_script_starts_reports_drains_and_restarts(
    rabbit: Any, queue_name: str, tmp_path: Path
) -> None:
    """start detaches a daemon with a pidfile; status sees it; stop drains in-flight messages; restart
    gives a new process; a stale pidfile does not block the start."""
    from support.amqp_tools import publish
    from support.waiting import poll_until

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
        "EXTRA_ARGS": "--handler support.handlers:slow --shutdown-timeout 20",
        "PYTHONPATH": str(TESTS),
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


needs_root_and_start_stop_daemon = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("start-stop-daemon") is None,
    reason="needs root and start-stop-daemon",
)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory under /tmp that the service user "nobody" can reach (tmp_path's parents are root's)."""
    home = Path(tempfile.mkdtemp(prefix="consumer-init-", dir="/tmp"))
    home.chmod(0o755)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def _init_env(home: Path, queue: str, url: str) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "QUEUE": queue,
        "TWISTD": str(Path(sys.executable).with_name("twistd")),
        "CONFIG": str(home / "no-such.conf"),
        "PIDFILE": str(home / "run" / "c.pid"),
        "LOGFILE": str(home / "log" / "c.log"),
        "AMQP_URL": url,
        "RUN_AS": "nobody:nogroup",
    }


def _init(action: str, env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INIT), action], env=env, cwd=home, capture_output=True, text=True, timeout=90
    )


@needs_root_and_start_stop_daemon
def test_the_init_script_gives_root_no_symlink_to_follow(
    rabbit: Any, queue_name: str, shared_tmp: Path
) -> None:
    """Directories the service user owned become root's; planted symlinks refuse the start and
    no root-only file is written or created through them; the daemon then runs as the user."""
    from support.waiting import poll_until

    home = shared_tmp
    env = _init_env(home, queue_name, rabbit.url())
    run, logs = home / "run", home / "log"
    private = home / "private"
    private.mkdir(mode=0o700)
    secret = private / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    created = private / "created"
    for directory in (run, logs):  # the layout the old script left: the service user's
        directory.mkdir()
        shutil.chown(directory, "nobody", "nogroup")
    plants = [(run / "c.pid", secret), (logs / "c.log", secret), (logs / "c.log", created)]
    for link, target in plants:
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        started = _init("start", env, home)
        assert started.returncode != 0
        assert "is a symlink" in started.stderr
        link.unlink()
    assert secret.read_text() == "root only\n"
    assert not created.exists()
    assert (run.stat().st_uid, logs.stat().st_uid) == (0, 0)
    assert oct(run.stat().st_mode & 0o777) == oct(0o755)

    started = _init("start", env, home)
    assert started.returncode == 0, started.stdout + started.stderr
    logfile, pidfile = logs / "c.log", run / "c.pid"
    poll_until(lambda: "Consuming queue" in logfile.read_text(), 30, message="the daemon consuming")
    pid = int(pidfile.read_text())
    uid_line = next(
        line
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("Uid:")
    )
    assert set(uid_line.split()[1:]) == {str(pwd.getpwnam("nobody").pw_uid)}
    assert _init("status", env, home).returncode == 0
    stopped = _init("stop", env, home)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    poll_until(lambda: not Path(f"/proc/{pid}").exists(), 10, message="the daemon reaped")
    assert not pidfile.exists()


@needs_root_and_start_stop_daemon
def test_stop_never_kills_a_process_that_is_not_the_daemon(shared_tmp: Path) -> None:
    """A pidfile naming a root process of the same interpreter, or the service user's other
    process, leaves both alive: stop matches --exec and --user, not the pid alone."""
    home = shared_tmp
    env = _init_env(home, "q", "amqp://guest:guest@127.0.0.1:1/")
    (home / "run").mkdir()
    pidfile = home / "run" / "c.pid"
    same_interpreter_as_root = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"]
    )
    other_of_the_user = subprocess.Popen(["/bin/sleep", "120"], user="nobody")
    try:
        for victim in (same_interpreter_as_root, other_of_the_user):
            pidfile.write_text(f"{victim.pid}\n")
            stopped = _init("stop", env, home)
            assert stopped.returncode == 0, stopped.stderr
            assert "was not running" in stopped.stdout
            assert _init("status", env, home).returncode != 0
        assert same_interpreter_as_root.poll() is None
        assert other_of_the_user.poll() is None
    finally:
        for process in (same_interpreter_as_root, other_of_the_user):
            process.send_signal(signal.SIGKILL)
            process.wait(10)


TAP_CONF = CHECKOUT / "tap.conf"


def test_the_shipped_tap_conf_works_once_copied_to_etc(
    rabbit: Any, queue_name: str, tmp_path: Path
) -> None:
    """tap.conf copied elsewhere and used from another directory, without the source tree on the path, consumes and acks."""
    from support.amqp_tools import publish
    from support.twistd_support import TWISTD
    from support.waiting import poll_until

    etc = tmp_path / "etc" / "consumer_svc"
    etc.mkdir(parents=True)
    shutil.copy(TAP_CONF, etc / "tap.conf")
    elsewhere = tmp_path / "srv"
    elsewhere.mkdir()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "CONSUMER_"))}
    environ.pop("PYTHONPATH", None)
    environ["AMQP_URL"] = rabbit.url()
    log = tmp_path / "twistd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "consumer", "--config", str(etc / "tap.conf"), "--queue", queue_name],
            cwd=elsewhere, env=environ, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            poll_until(
                lambda: "Consuming queue" in log.read_text() or process.poll() is not None,
                30,
                message="consuming",
            )
            assert process.poll() is None, log.read_text()
            publish(rabbit.url(), queue_name, [b"hello"])
            poll_until(
                lambda: (
                    rabbit.list_queues()[queue_name].messages_ready == 0
                    and rabbit.list_queues()[queue_name].messages_unacknowledged == 0
                    and "hello" in log.read_text()
                ),
                30,
                message="the message handled and acked",
            )
        finally:
            process.terminate()
            process.wait(30)
