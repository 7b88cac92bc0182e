"""Example handlers: one of each kind consumer_svc accepts.

Run one with ``twistd -n consumer --queue task_queue --handler examples.tasks:handle``
from the repository root.
"""

from __future__ import annotations

import asyncio
import time

from twisted.internet import task
from twisted.logger import Logger

import consumer_svc

log = Logger()


def handle(message: consumer_svc.Message) -> object:
    """A Deferred-returning handler: simulated I/O, then the message is acked.

    The body may be a number of seconds of "work" (as in RabbitMQ's
    task_queue tutorial, one per dot); the reactor stays free meanwhile.
    """
    from twisted.internet import reactor

    seconds = message.body.count(b".") * 0.1
    log.info("Working {seconds:.1f}s on {body!r}", seconds=seconds, body=message.body[:40])
    return task.deferLater(reactor, seconds, lambda: None)


async def handle_async(message: consumer_svc.Message) -> None:
    """A coroutine handler: awaits Deferreds like any async code on Twisted."""
    from twisted.internet import reactor

    await task.deferLater(reactor, 0.01, lambda: None)
    log.info("Handled {body!r}", body=message.body[:40])


async def handle_asyncio(message: consumer_svc.Message) -> None:
    """A coroutine using asyncio code: run it under the asyncio reactor.

    ``twistd -n -r asyncio consumer --queue task_queue --handler examples.tasks:handle_asyncio``
    runs it as an asyncio task, so asyncio libraries (here ``asyncio.sleep``) and
    Deferreds can both be awaited. Under another reactor it fails, saying so.
    """
    from twisted.internet import reactor

    await asyncio.sleep(message.body.count(b".") * 0.1)
    await task.deferLater(reactor, 0.01, lambda: None)
    log.info("Handled {body!r} with asyncio", body=message.body[:40])


@consumer_svc.blocking
def handle_blocking(message: consumer_svc.Message) -> None:
    """A blocking handler: runs in the thread pool, so heartbeats go on meanwhile."""
    time.sleep(message.body.count(b".") * 0.1)
    log.info("Handled {body!r} in a thread", body=message.body[:40])


def handle_json(message: consumer_svc.Message) -> None:
    """Decode JSON; a body that is not JSON fails the handler (and is requeued)."""
    payload = message.json()
    if not isinstance(payload, dict) or "task" not in payload:
        raise consumer_svc.Reject(f"no 'task' in {payload!r}")
    log.info("Task {task}", task=payload["task"])
