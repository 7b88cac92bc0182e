"""Running `twistd consumer` as a subprocess, with its log and its handlers' record in files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import TESTS
from .waiting import poll_until

TWISTD = str(Path(sys.executable).with_name("twistd"))


class Twistd:
    """A `twistd -n consumer` subprocess with its log in a file."""

    def __init__(
        self,
        tmp: Path,
        args: list[str],
        env: dict[str, str] | None = None,
        twistd_args: tuple[str, ...] = (),
        name: str = "",
    ) -> None:
        self.log = tmp / f"twistd{name}.log"
        self.record = tmp / f"record{name}.txt"
        self.record.touch()
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "CONSUMER_"))}
        environ.update({"RECORD": str(self.record), "PYTHONPATH": str(TESTS)}, **(env or {}))
        self._out = open(self.log, "wb")  # noqa: SIM115 (closed in wait)
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *twistd_args, "consumer", *args],
            cwd=tmp,
            env=environ,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def records(self, outcome: str) -> list[str]:
        return [
            line.split(" ", 1)[1]
            for line in self.record.read_text().splitlines()
            if line.startswith(outcome + " ")
        ]

    def wait_for_log(self, text: str, timeout: float) -> None:
        poll_until(
            lambda: text in self.text() or self.process.poll() is not None,
            timeout,
            message=f"{text!r} in the log",
        )
        assert text in self.text(), self.text()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._out.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._out.close()


@pytest.fixture
def twistd(tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    started: list[Twistd] = []

    def start(
        args: list[str], env: dict[str, str] | None = None, twistd_args: tuple[str, ...] = ()
    ) -> Twistd:
        """``twistd -n --pidfile= [twistd_args] consumer [args]``, e.g. twistd_args=("-r", "asyncio")."""
        process = Twistd(tmp_path, args, env, twistd_args, name=str(len(started) or ""))
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
