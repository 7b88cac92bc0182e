"""Downstream outages and silent stalls, against a real broker: pause instead of dead-lettering.

A handler whose database is down fails every message. Retrying on the usual schedule would
empty the work queue into the dead-letter queue; the service pauses instead, probes with one
message, and resumes when the downstream is back. A subscription that stops delivering
without a word from the broker is noticed and recovered.
"""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from support.amqp_tools import publish
from support.logs import Logs
from support.service_support import Running, queue_settles, send, settings_for
from support.twistd_support import Twistd
from support.waiting import eventually, poll_until
from twisted.internet.threads import deferToThread

from consumer_svc import Message, Pause
from consumer_svc._settings import Settings
from consumer_svc.testing.rabbitmq import RabbitNode, free_port

Services = Callable[[Settings, Callable[[Message], Any]], Running]

pytestmark = pytest.mark.brokers("3.10", "4.0")


class Downstream:
    """A database that is down until told otherwise; the handler fails while it is."""

    def __init__(self) -> None:
        self.up = False
        self.done: set[bytes] = set()
        self.attempts = 0

    def handler(self, message: Message) -> None:
        self.attempts += 1
        if not self.up:
            raise ConnectionError("database down")
        self.done.add(message.body)


@pytest_twisted.ensureDeferred
async def test_a_downstream_outage_pauses_instead_of_dead_lettering(
    rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """30 messages during an outage: the service pauses, probes, and handles all of them once the database is back; none parked."""
    db = Downstream()
    settings = settings_for(
        rabbit.url(), queue_name, max_retries=2, retry_delay=1, pause_after=3, pause_max=2
    )
    run = services(settings, db.handler)
    await run.consuming()
    await send(rabbit, queue_name, [b"m%d" % i for i in range(30)])
    await eventually(lambda: run.service.consumer.paused is not None, timeout=20, what="a pause")
    ready, state = run.service.readiness()
    assert not ready
    assert state.startswith("paused: 3 failures in a row")
    # Probes keep failing while it is down: not one message is parked meanwhile.
    attempts = db.attempts
    await eventually(lambda: db.attempts >= attempts + 2, timeout=20, what="two failed probes")
    db.up = True
    await eventually(lambda: len(db.done) == 30, timeout=60, what="every message handled")
    assert run.service.consumer.paused is None
    await queue_settles(rabbit, queue_name)
    dead = (await deferToThread(rabbit.list_queues)).get(f"{queue_name}.dead")
    assert dead is not None
    assert dead.messages_ready == 0
    exposition = run.service.metrics.render().decode()
    assert "consumer_paused 0.0" in exposition
    assert "consumer_pauses_total 1.0" in exposition


@pytest_twisted.ensureDeferred
async def test_a_handler_asks_for_a_pause(
    rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """Pause("db down", delay=1) hands the message back unharmed (no retry count) and tries again a second later."""
    seen: list[object] = []

    def handler(message: Message) -> None:
        seen.append(message.headers.get("consumer-svc-retries"))
        if len(seen) == 1:
            raise Pause("db down", delay=1)

    run = services(settings_for(rabbit.url(), queue_name), handler)
    await run.consuming()
    await send(rabbit, queue_name, [b"job"])
    await eventually(lambda: len(seen) == 2, timeout=20, what="the probe")
    assert seen == [None, None]
    await queue_settles(rabbit, queue_name)
    assert run.service.consumer.paused is None


@pytest_twisted.ensureDeferred
async def test_a_subscription_that_silently_stops_delivering_is_recovered(
    rabbit: RabbitNode, queue_name: str, services: Services, logs: Logs
) -> None:
    """The subscription goes without a basic.cancel reaching us: the stall check notices ready messages and reconnects."""
    handled: list[bytes] = []
    run = services(
        settings_for(rabbit.url(), queue_name, stall_check=2), lambda m: handled.append(m.body)
    )
    await run.consuming()
    consumer = run.service.consumer
    channel = consumer.channel
    assert channel is not None
    assert consumer.consumer_tag is not None
    # Behind the service's back, as a lost frame or a broker bug would: pika forgets the consumer too.
    channel._pika.basic_cancel(consumer.consumer_tag)
    await send(rabbit, queue_name, [b"a", b"b", b"c"])
    await eventually(lambda: len(handled) == 3, timeout=30, what="the messages after the stall")
    assert any("the broker no longer delivers to us" in line for line in logs.lines())
    await queue_settles(rabbit, queue_name)


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_operator_pauses_with_sigtstp_and_resumes_with_sigcont(
    rabbit: RabbitNode, queue_name: str, twistd: Callable[..., Twistd]
) -> None:
    """SIGTSTP: /readyz 503 "paused", nothing consumed; SIGCONT: consuming again."""
    port = free_port()
    run = twistd(["--url", rabbit.url(), "--queue", queue_name, "--health-port", str(port)])
    run.wait_for_log("Consuming queue", 30)
    run.process.send_signal(signal.SIGTSTP)
    poll_until(lambda: readyz(port)[0] == 503, 10, message="/readyz 503")
    assert "paused by the operator" in readyz(port)[1]
    publish(rabbit.url(), queue_name, [b"later"], declare=False)
    run.wait_for_log("Paused: paused by the operator (SIGTSTP)", 5)
    assert rabbit.list_queues()[queue_name].messages_ready == 1
    run.process.send_signal(signal.SIGCONT)
    poll_until(lambda: rabbit.list_queues()[queue_name].messages_ready == 0, 20, message="consumed")
    assert readyz(port)[0] == 200
    run.process.send_signal(signal.SIGTERM)
    assert run.wait(30) == -signal.SIGTERM
