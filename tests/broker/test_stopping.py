"""Stopping against a real broker: every ack owed sent before closing, and twistd ending in time
whatever the handlers do (the deadline on a clock: tests/unit/test_stopping.py).
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from typing import Any

import pika
import pytest
import pytest_twisted
from support.amqp_tools import connect, publish, queue_counts
from support.service_support import Recorder, queue_settles, settings_for, sleep
from support.twistd_support import Twistd
from support.waiting import eventually, poll_until, within
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from consumer_svc import Message
from consumer_svc.testing.rabbitmq import RabbitNode

#: Messages in flight when the stop comes: pika's and RabbitMQ's largest prefetch.
WINDOW = 65_535


def flood(url: str, queue: str, count: int) -> None:
    """Publish ``count`` small transient messages fast (no confirms: the test counts them on the queue)."""
    connection = connect(url, timeout=60)
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        for i in range(count):
            channel.basic_publish("", queue, b"load%d" % i, pika.BasicProperties())
    finally:
        connection.close()


def slow_handler(message: Message) -> Deferred[None]:
    return sleep(1 + random.random())


class Finished:
    """Records each message whose handler finished: those the service owes an ack for."""

    def __init__(self, behaviour: Callable[[Message], Any]) -> None:
        self.behaviour = behaviour
        self.bodies: list[bytes] = []

    def __call__(self, message: Message) -> Any:
        result = self.behaviour(message)
        if isinstance(result, Deferred):
            return result.addCallback(lambda _: self.bodies.append(message.body))
        self.bodies.append(message.body)
        return result


@pytest.mark.parametrize(
    "handler",
    [slow_handler, lambda message: None],
    ids=["a full window in flight", "fast handlers, deliveries still arriving"],
)
@pytest.mark.timeout(300)
@pytest_twisted.ensureDeferred
async def test_a_stop_under_load_sends_every_ack_it_owes(
    rabbit: RabbitNode, queue_name: str, services: Any, handler: Callable[[Message], Any]
) -> None:
    """Stopped under load with 65,535 messages of prefetch, no message that was handled and settled comes back."""
    total = WINDOW + 5_000
    await deferToThread(flood, rabbit.url(), queue_name, total)
    await eventually(
        lambda: queue_counts(rabbit.url(), queue_name)[0] == total,
        timeout=60,
        what="every message queued",
        blocking=True,
    )
    # Those handed back at the deadline never finished: only finished ones must not return.
    first = Finished(handler)
    settings = settings_for(
        # The close that carries the acks gets what the drain leaves of the stop: with 65,535
        # unacked at the broker it took 10-22 s at load 5-7 on 2 cores (at most 4.5 s were left
        # of a 20 s stop), so a stop this size is given 45 s, as an operator would.
        rabbit.url(),
        queue_name,
        prefetch=WINDOW,
        concurrency=WINDOW,
        shutdown_timeout=45,
    )
    run = services(settings, first)
    await eventually(lambda: len(first.bodies) >= total // 3, timeout=60, what="a third handled")
    started = time.monotonic()
    await within(55, run.service.stopService(), "the stop")
    stop_seconds = time.monotonic() - started
    settled = set(first.bodies)
    second = Recorder()
    services(settings_for(rabbit.url(), queue_name, prefetch=1000), second)
    await eventually(
        lambda: len(settled | set(second.bodies)) == total, timeout=120, what="every message"
    )
    await queue_settles(rabbit, queue_name, timeout=30)
    back = settled & set(second.bodies)
    print(
        f"stop under load: {len(settled)} settled, {len(back)} came back, "
        f"the stop took {stop_seconds:.1f}s"
    )
    assert not back, f"{len(back)} of {len(settled)} settled messages came back"


# -- through twistd


def test_sigterm_after_a_blocking_handler_timed_out_ends_in_time(
    rabbit: RabbitNode, queue_name: str, twistd: Callable[..., Twistd]
) -> None:
    """A @blocking handler still stuck after its --handler-timeout does not keep SIGTERM from ending the process in time."""
    publish(rabbit.url(), queue_name, [b"stuck"])
    run = twistd(
        ["--url", rabbit.url(), "--queue", queue_name, "--handler", "support.handlers:blocking_sleep",
         "--handler-timeout", "1", "--shutdown-timeout", "2", "--retry-delay", "600"],
        env={"HANDLER_SECONDS": "120"},
    )  # fmt: skip
    run.wait_for_log("cancelled after 1s (--handler-timeout)", 30)
    started = time.monotonic()
    run.process.send_signal(signal.SIGTERM)
    assert run.wait(30) == -signal.SIGTERM
    assert time.monotonic() - started < 2 + 5
    assert "1 blocking handler thread(s) still running past the deadline; abandoned" in run.text()


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_during_the_drain_ends_it_at_once(
    rabbit: RabbitNode, queue_name: str, twistd: Callable[..., Twistd], number: signal.Signals
) -> None:
    """A second SIGTERM or SIGINT while handlers drain hands their messages back and ends the process at once, without a traceback."""
    publish(rabbit.url(), queue_name, [b"a", b"b"])
    run = twistd(
        ["--url", rabbit.url(), "--queue", queue_name, "--handler", "support.handlers:forever",
         "--shutdown-timeout", "120"]
    )  # fmt: skip
    poll_until(lambda: len(run.records("start")) == 2, 30, message="2 handlers running")
    run.process.send_signal(number)
    run.wait_for_log("Stopping: 2 message(s) in flight", 30)
    started = time.monotonic()
    run.process.send_signal(number)
    assert run.wait(30) == -number
    assert time.monotonic() - started < 5
    text = run.text()
    assert f"{number.name} again while stopping" in text
    assert "Stopping at once with 2 message(s) in flight; handing them back" in text
    assert "Traceback" not in text
    assert "ReactorNotRunning" not in text
    assert counts_of(rabbit, queue_name) == (2, 0)


def counts_of(node: RabbitNode, queue: str) -> tuple[int, int]:
    stats = node.list_queues()[queue]
    return stats.messages_ready, stats.messages_unacknowledged
