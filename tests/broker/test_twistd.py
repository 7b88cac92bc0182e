"""`twistd consumer` as a process against a real broker: signals, deadlines, exit statuses, the
asyncio example and daemon mode.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import CHECKOUT, TESTS
from support.amqp_tools import publish
from support.twistd_support import TWISTD, Twistd
from support.waiting import poll_until

import consumer_svc
from consumer_svc.testing.rabbitmq import RabbitNode


def counts(node: RabbitNode, queue: str) -> tuple[int, int]:
    stats = node.list_queues()[queue]
    return stats.messages_ready, stats.messages_unacknowledged


def test_sigterm_finishes_in_flight_messages_and_exits(
    rabbit: RabbitNode, queue_name: str, twistd: Callable[..., Twistd]
) -> None:
    """On SIGTERM, running handlers finish and are acked, the rest stay queued, and twistd exits before its deadline."""
    publish(rabbit.url(), queue_name, [f"job{i}".encode() for i in range(10)])
    run = twistd(
        [
            "--url",
            rabbit.url(),
            "--queue",
            queue_name,
            "--handler",
            "support.handlers:slow",
            "--prefetch",
            "4",
            "--shutdown-timeout",
            "20",
        ],
        env={"HANDLER_SECONDS": "2"},
    )
    poll_until(lambda: len(run.records("start")) == 4, 30, message="4 handlers running")
    started = time.monotonic()
    run.process.send_signal(signal.SIGTERM)
    status = run.wait(30)
    elapsed = time.monotonic() - started
    assert status == -signal.SIGTERM  # twistd re-raises the signal after a clean stop
    assert elapsed < 20
    done = run.records("done")
    assert sorted(done) == sorted(run.records("start"))  # every started handler finished
    assert counts(rabbit, queue_name) == (
        10 - len(done),
        0,
    )  # finished were acked, the rest are back
    assert "Stopping: 4 message(s) in flight" in run.text()
    assert "Closing the AMQP connection" in run.text()


def test_the_shutdown_deadline_hands_back_what_is_still_running(
    rabbit: RabbitNode, queue_name: str, twistd: Callable[..., Twistd]
) -> None:
    """Handlers that never finish are cut off at --shutdown-timeout and their messages go back to the queue."""
    publish(rabbit.url(), queue_name, [b"a", b"b", b"c"])
    run = twistd(
        [
            "--url",
            rabbit.url(),
            "--queue",
            queue_name,
            "--handler",
            "support.handlers:forever",
            "--shutdown-timeout",
            "2",
        ]
    )
    poll_until(lambda: len(run.records("start")) == 3, 30, message="3 handlers running")
    started = time.monotonic()
    run.process.send_signal(signal.SIGTERM)
    run.wait(30)
    elapsed = time.monotonic() - started
    assert 2 <= elapsed < 10
    assert counts(rabbit, queue_name) == (3, 0)
    assert "Shutdown deadline reached with 3 message(s) in flight" in run.text()


def test_a_stuck_blocking_handler_does_not_hold_the_process(
    rabbit: RabbitNode, queue_name: str, twistd: Callable[..., Twistd]
) -> None:
    """A @blocking handler still sleeping at the deadline is abandoned; the process exits and the message is requeued."""
    publish(rabbit.url(), queue_name, [b"stuck"])
    run = twistd(
        [
            "--url",
            rabbit.url(),
            "--queue",
            queue_name,
            "--handler",
            "support.handlers:blocking_sleep",
            "--shutdown-timeout",
            "1",
        ],
        env={"HANDLER_SECONDS": "120"},
    )
    poll_until(lambda: run.records("start") == ["stuck"], 30, message="the handler running")
    run.process.send_signal(signal.SIGTERM)
    run.wait(30)
    assert counts(rabbit, queue_name) == (1, 0)
    assert "blocking handler thread(s) still running past the deadline; abandoned" in run.text()


def test_wrong_credentials_exit_77_with_one_line(
    rabbit: RabbitNode, queue_name: str, twistd: Callable[..., Twistd]
) -> None:
    """A refused login is one log line without a traceback or the password, and exit status 77."""
    run = twistd(["--queue", queue_name], env={"AMQP_URL": rabbit.url(password="hunter2-secret")})
    assert run.wait(30) == consumer_svc.ExitStatus.ACCESS_REFUSED
    text = run.text()
    assert "hunter2-secret" not in text
    assert "Traceback" not in text
    [line] = [line for line in text.splitlines() if "Giving up" in line]
    assert "ACCESS_REFUSED" in line


def example_path(tmp_path: Path) -> str:
    """A PYTHONPATH with the tests' handlers and a copy of examples/ (not the sources: the
    installed consumer_svc must be the one imported)."""
    lib = tmp_path / "lib"
    shutil.copytree(CHECKOUT / "examples", lib / "examples")
    return f"{TESTS}{os.pathsep}{lib}"


def test_the_asyncio_example_runs_under_the_asyncio_reactor(
    rabbit: RabbitNode, queue_name: str, twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    """`twistd -r asyncio consumer --handler examples.tasks:handle_asyncio` awaits asyncio and Deferreds, and acks each message."""
    publish(rabbit.url(), queue_name, [b"a.", b"b.", b"c"])
    run = twistd(
        [
            "--url",
            rabbit.url(),
            "--queue",
            queue_name,
            "--handler",
            "examples.tasks:handle_asyncio",
        ],
        env={"PYTHONPATH": example_path(tmp_path)},
        twistd_args=("-r", "asyncio"),
    )
    poll_until(
        lambda: run.text().count("with asyncio") == 3 or run.process.poll() is not None,
        30,
        message="3 messages handled",
    )
    poll_until(lambda: counts(rabbit, queue_name) == (0, 0), 10, message="the queue empty")
    text = run.text()
    assert "AsyncioSelectorReactor" in text
    assert "failed" not in text
    run.process.send_signal(signal.SIGTERM)
    assert run.wait(30) == -signal.SIGTERM


def test_the_asyncio_example_under_another_reactor_says_to_use_asyncio(
    rabbit: RabbitNode, queue_name: str, twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    """Without -r asyncio the message fails (here parked at once) with one line saying to use it."""
    publish(rabbit.url(), queue_name, [b"a."])  # a dot: asyncio.sleep(0.1), which needs a loop
    run = twistd(
        ["--url", rabbit.url(), "--queue", queue_name, "--handler", "examples.tasks:handle_asyncio", "--max-retries", "0"],
        env={"PYTHONPATH": example_path(tmp_path)},
    )  # fmt: skip
    dead = f"{queue_name}.dead"
    poll_until(
        lambda: dead in rabbit.list_queues() and counts(rabbit, dead) == (1, 0),
        30,
        message="the message parked",
    )
    [line] = [line for line in run.text().splitlines() if "Handler examples.tasks" in line]
    assert "AsyncioReactorRequired" in line
    assert "run twistd -r asyncio consumer" in line
    assert counts(rabbit, queue_name) == (0, 0)
    rabbit.delete_queue(dead)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_daemon_mode_detaches_drops_privileges_and_cleans_up(
    rabbit: RabbitNode, queue_name: str
) -> None:
    """Without -n twistd detaches, writes its pidfile, logs to its file and runs as --uid/--gid; SIGTERM stops it and removes the pidfile."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    # Not under tmp_path: its parents are private to root, and the daemon, as nobody,
    # must reach its pidfile to remove it.
    home = Path(tempfile.mkdtemp(prefix="consumer-daemon-", dir="/tmp"))
    home.chmod(0o777)
    pidfile, logfile = home / "consumer.pid", home / "consumer.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "CONSUMER_"))}
    environ["AMQP_URL"] = rabbit.url()
    started = subprocess.run(
        [TWISTD, "--pidfile", str(pidfile), "--logfile", str(logfile), "--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid), "--rundir", str(home), "consumer", "--queue", queue_name],
        env=environ, cwd=home, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    poll_until(
        lambda: logfile.exists() and "Consuming queue" in logfile.read_text(),
        30,
        message="the daemon consuming",
    )
    pid = int(pidfile.read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    [uid_line] = [line for line in status.splitlines() if line.startswith("Uid:")]
    assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4
    os.kill(pid, signal.SIGTERM)
    poll_until(lambda: not Path(f"/proc/{pid}").exists(), 30, message="the daemon gone")
    try:
        assert not pidfile.exists(), logfile.read_text()
        assert "Stopped" in logfile.read_text()
    finally:
        shutil.rmtree(home, ignore_errors=True)
