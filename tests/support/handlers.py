"""Handlers that `twistd consumer` subprocesses import in the tests.

Each appends ``<outcome> <body>`` to the file named by $RECORD, so a test can
count what was handled even after the process is gone.
"""

from __future__ import annotations

import os
import time

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

import consumer_svc


def _record(outcome: str, message: consumer_svc.Message) -> None:
    with open(os.environ["RECORD"], "a", encoding="utf-8") as f:
        f.write(f"{outcome} {message.body.decode()}\n")


def slow(message: consumer_svc.Message) -> Deferred[None]:
    """Takes $HANDLER_SECONDS (default 2) without blocking the reactor."""
    _record("start", message)
    seconds = float(os.environ.get("HANDLER_SECONDS", "2"))
    return task.deferLater(reactor, seconds, _record, "done", message)


def forever(message: consumer_svc.Message) -> Deferred[None]:
    """Never finishes (until cancelled at the shutdown deadline)."""
    _record("start", message)
    return Deferred()


@consumer_svc.blocking
def blocking_sleep(message: consumer_svc.Message) -> None:
    """Blocks its thread for $HANDLER_SECONDS."""
    _record("start", message)
    time.sleep(float(os.environ.get("HANDLER_SECONDS", "2")))
    _record("done", message)


def leaky(message: consumer_svc.Message) -> None:
    """Fails with the service's own broker URL and password in its exception text."""
    url = os.environ["LEAKED_URL"]
    password = url.split("//", 1)[1].rsplit("@", 1)[0].split(":", 1)[1]
    raise ValueError(f"cannot reach {url} with password {password}")


def broken_at_import() -> None:
    raise AssertionError("never called")


raise_on_import = os.environ.get("HANDLERS_RAISE_ON_IMPORT") == "1"
if raise_on_import:
    raise RuntimeError("handler module failed while importing")


if os.environ.get("HANDLERS_BLOCKING_COROUTINE") == "1":

    @consumer_svc.blocking
    async def blocking_coroutine(message: consumer_svc.Message) -> None:
        """A thread cannot await this: the decorator refuses it, so the import fails."""
