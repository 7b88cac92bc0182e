"""`twistd consumer` as a process, without a broker: the plugin, and bad input refused before
connecting.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable

import pytest
from support.twistd_support import TWISTD, Twistd

import consumer_svc


def test_the_plugin_is_installed() -> None:
    """`twistd --help` lists the consumer plugin."""
    out = subprocess.run(
        [TWISTD, "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "consumer" in out


@pytest.mark.parametrize(
    ("args", "env", "status", "says"),
    [
        (["--queue", "q", "--handler", "support.handlers:nope"], {}, 65, "module 'support.handlers' has no attribute 'nope'"),
        (["--queue", "q", "--handler", "support.handlers:slow"], {"HANDLERS_RAISE_ON_IMPORT": "1"}, 65, "RuntimeError: handler module failed while importing"),
        (["--queue", "q", "--handler", "pkgutil:walk_packages"], {}, 65, "--handler 'pkgutil:walk_packages' is a generator function: calling it runs nothing; decorate it with @twisted.internet.defer.inlineCallbacks"),
        (["--queue", "q", "--handler", "support.handlers:blocking_coroutine"], {"HANDLERS_BLOCKING_COROUTINE": "1"}, 65, "TypeError: support.handlers.blocking_coroutine is a coroutine function marked @consumer_svc.blocking: a thread cannot await it"),
        (["--queue", "q", "--handler", "support.handlers:slow"], {"HANDLERS_RAISE_ON_IMPORT": "1"}, 65, "RuntimeError: handler module failed while importing ("),
        (["--queue", "q", "--handler", "support.handlers:slow"], {"HANDLERS_RAISE_ON_IMPORT": "1"}, 65, "handlers.py, line "),
        (["--queue", "q", "--prefetch", "0"], {}, 64, "--prefetch must be a whole number from 1 to 65535, got '0'"),
        (["--queue", "q", "--config", "missing.conf"], {}, 64, "cannot read config file 'missing.conf'"),
    ],
)  # fmt: skip
def test_bad_input_stops_before_connecting(
    args: list[str], env: dict[str, str], status: int, says: str, twistd: Callable[..., Twistd]
) -> None:
    """A handler that cannot be imported or a bad value is one line on stderr and a documented status."""
    run = twistd(["--url", "amqp://guest:guest@127.0.0.1:1/", *args], env=env)
    assert run.wait(60) == status
    lines = run.text().strip().splitlines()
    assert lines == [f"twistd consumer: error: {lines[0].split('error: ', 1)[1]}"]
    assert says in lines[0]


def test_a_taken_health_port_is_one_line_and_exit_64(twistd: Callable[..., Twistd]) -> None:
    """A health port another process holds ends the start with one line, no traceback, exit 64, before connecting."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = twistd(
            ["--url", "amqp://guest:guest@127.0.0.1:1/", "--queue", "q", "--health-port", str(port)]
        )
        assert run.wait(60) == consumer_svc.ExitStatus.CONFIG.value == 64
    text = run.text()
    assert "Traceback" not in text
    [line] = [line for line in text.splitlines() if "cannot listen" in line]
    assert line.endswith(
        f"--health-port: cannot listen on 127.0.0.1:{port}: address already in use (exit status 64)"
    )
    assert "Connecting to" not in text
