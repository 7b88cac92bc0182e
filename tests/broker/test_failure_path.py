"""The failure path against a real broker: copies that survive restarts and carry only what is safe.

A message whose handler failed is copied to a retry queue or the dead-letter queue. These
tests break the broker while copies wait, publish what a hostile publisher would, and run
the service with the least privilege an operator can give it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pika
import pytest
import pytest_twisted
from support.amqp_tools import declare, get_messages, queue_counts
from support.logs import Logs
from support.service_support import Running, queue_settles, send, settings_for
from support.waiting import eventually
from twisted.internet.threads import deferToThread

from consumer_svc import Message, Reject, Retry
from consumer_svc._retry import dead_letter_arguments, retry_queue
from consumer_svc._settings import Settings
from consumer_svc.testing.rabbitmq import RabbitNode

Services = Callable[[Settings, Callable[[Message], Any]], Running]

pytestmark = pytest.mark.brokers("3.10", "4.0")


def publish_as(url: str, queue: str, body: bytes, properties: pika.BasicProperties) -> None:
    """One confirmed publish with the given properties, to the default exchange."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue, body, properties, mandatory=True)
    finally:
        connection.close()


async def ready(node: RabbitNode, queue: str, count: int, timeout: float = 30) -> None:
    await eventually(
        lambda: (
            (stats := node.list_queues().get(queue)) is not None and stats.messages_ready == count
        ),
        timeout=timeout,
        what=f"{count} ready message(s) in {queue}",
        blocking=True,
    )


@pytest.mark.parametrize("crash", ["restart", "kill -9"])
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
@pytest_twisted.ensureDeferred
async def test_messages_waiting_for_a_retry_survive_the_broker_going_down(
    fresh_rabbit: RabbitNode, queue_name: str, services: Services, queue_type: str, crash: str
) -> None:
    """Five copies waiting 10 s in a retry queue while the broker goes down come back and are handled: none lost."""
    attempts: dict[bytes, int] = {}

    def once_later(message: Message) -> None:
        attempts[message.body] = attempts.get(message.body, 0) + 1
        if attempts[message.body] == 1:
            raise Retry("later", delay=10)

    settings = settings_for(
        fresh_rabbit.url(), queue_name, queue_arguments={"x-queue-type": queue_type}
    )
    run = services(settings, once_later)
    await run.consuming()
    bodies = [b"m%d" % i for i in range(5)]
    await send(fresh_rabbit, queue_name, bodies, declare=False)
    await ready(fresh_rabbit, f"{queue_name}.retry.10s", 5)
    if crash == "kill -9":
        await deferToThread(fresh_rabbit.kill)
        await deferToThread(fresh_rabbit.start)
    else:
        await deferToThread(fresh_rabbit.ctl, "stop_app")
        await deferToThread(fresh_rabbit.ctl, "start_app")
    await eventually(
        lambda: all(attempts.get(b, 0) >= 2 for b in bodies),
        timeout=60,
        what="every message handled again after the broker came back",
    )
    await queue_settles(fresh_rabbit, queue_name, timeout=30)
    assert sorted(attempts) == bodies


@pytest_twisted.ensureDeferred
async def test_copies_carry_no_cc_bcc_death_headers_or_foreign_user_id(
    rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """A hostile message is retried and parked through the service's permissions, yet its copies route nowhere else."""
    elsewhere = [f"{queue_name}-payments", f"{queue_name}-audit"]
    for name in elsewhere:
        await deferToThread(declare, rabbit.url(), name)
    await deferToThread(rabbit.add_user, f"{queue_name}-producer", "secret")
    await deferToThread(rabbit.set_permissions, "/", f"{queue_name}-producer")
    seen: list[dict[str, Any]] = []

    def fail_twice(message: Message) -> None:
        seen.append(dict(message.headers))
        if len(seen) == 1:
            raise Retry("again", delay=1)
        raise Reject("hostile")

    run = services(settings_for(rabbit.url(), queue_name), fail_twice)
    await run.consuming()
    properties = pika.BasicProperties(
        delivery_mode=1,
        user_id=f"{queue_name}-producer",
        headers={
            "CC": [elsewhere[0]],
            "BCC": [elsewhere[1]],
            "x-death": [[None]],
            "x-first-death-queue": "forged",
            "tenant": "a",
        },
    )
    await deferToThread(
        publish_as,
        rabbit.url(f"{queue_name}-producer", "secret"),
        queue_name,
        b"hostile",
        properties,
    )
    await ready(rabbit, f"{queue_name}.dead", 1)
    [parked] = await deferToThread(get_messages, rabbit.url(), f"{queue_name}.dead")
    headers = parked.headers
    assert len(seen) == 2
    assert "CC" not in seen[1]
    # The only death history on the retried copy is the broker's own, from the retry queue.
    [death] = seen[1]["x-death"]
    assert death["queue"] == f"{queue_name}.retry.1s"
    for name in ("CC", "BCC", "x-death", "x-first-death-queue"):
        assert name not in headers
    assert headers["tenant"] == "a"
    assert headers["consumer-svc-original-user-id"] == f"{queue_name}-producer"
    assert "user_id" in headers["consumer-svc-stripped"]
    assert parked.properties.user_id is None
    assert parked.properties.delivery_mode == 2
    # Only the original publish reached the CC'd queues: none of the service's copies did.
    for name in elsewhere:
        assert (await deferToThread(queue_counts, rabbit.url(), name))[0] == 1
    await queue_settles(rabbit, queue_name)


@pytest.mark.parametrize(
    "count", [2**63 - 1, -5, "seven", b"\xff"], ids=["int64-max", "negative", "text", "bytes"]
)
@pytest_twisted.ensureDeferred
async def test_a_forged_retry_counter_never_loops(
    rabbit: RabbitNode, queue_name: str, services: Services, count: object
) -> None:
    """An absurd count parks at once; a non-numeric or negative one counts as a first attempt."""
    calls: list[int] = []

    def broken(message: Message) -> None:
        calls.append(1)
        raise RuntimeError("always")

    run = services(settings_for(rabbit.url(), queue_name, max_retries=1, retry_delay=1), broken)
    await run.consuming()
    await send(rabbit, queue_name, [b"x"], headers={"consumer-svc-retries": count})
    await ready(rabbit, f"{queue_name}.dead", 1)
    [parked] = await deferToThread(get_messages, rabbit.url(), f"{queue_name}.dead")
    if count == 2**63 - 1:
        assert calls == [1]
        assert parked.headers["consumer-svc-attempts"] == 1001
    else:
        assert calls == [1, 1]
        assert parked.headers["consumer-svc-attempts"] == 2
    await queue_settles(rabbit, queue_name)


@pytest_twisted.ensureDeferred
async def test_no_declare_runs_without_configure_permission_and_loses_nothing(
    rabbit: RabbitNode, queue_name: str, services: Services, logs: Logs
) -> None:
    """With --no-declare and no configure right, one warning names the missing queues; failures wait in the work queue until they exist."""
    user = f"{queue_name}-worker"
    await deferToThread(rabbit.add_user, user, "pw")
    await deferToThread(
        rabbit.set_permissions, "/", user, "^$", r"^amq\.default$", f"^{queue_name}$"
    )
    await deferToThread(declare, rabbit.url(), queue_name)
    calls: list[int] = []

    def rejects(message: Message) -> None:
        calls.append(1)
        raise Reject("park me")

    run = services(
        settings_for(rabbit.url(user, "pw"), queue_name, declare=False, max_retries=1), rejects
    )
    await run.consuming()
    await eventually(
        lambda: any("Not available for failed messages" in line for line in logs.lines()),
        timeout=10,
        what="the warning about missing queues",
    )
    [warning] = [line for line in logs.lines() if "Not available for failed messages" in line]
    assert f"{queue_name}.dead" in warning
    assert f"{queue_name}.retry.1s" in warning
    await send(rabbit, queue_name, [b"job"], declare=False)
    await eventually(
        lambda: len(calls) >= 2, timeout=10, what="the message handed back and redelivered"
    )
    assert run.exits == []
    # The operator declares the dead-letter queue: the message is parked there at its next failure.
    await deferToThread(
        declare, rabbit.url(), f"{queue_name}.dead", arguments=dead_letter_arguments({})
    )
    await ready(rabbit, f"{queue_name}.dead", 1)
    await queue_settles(rabbit, queue_name)


@pytest_twisted.ensureDeferred
async def test_a_missing_retry_queue_with_no_declare_is_declared_by_the_operator_then_used(
    rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """Declared by hand with the documented arguments, the retry queue takes the retries of a --no-declare service."""
    await deferToThread(declare, rabbit.url(), queue_name)
    name, arguments = retry_queue(queue_name, 1)
    await deferToThread(declare, rabbit.url(), name, arguments=arguments)
    await deferToThread(declare, rabbit.url(), f"{queue_name}.dead")
    calls: list[int] = []

    def flaky(message: Message) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("once")

    run = services(settings_for(rabbit.url(), queue_name, declare=False, retry_delay=1), flaky)
    await run.consuming()
    await send(rabbit, queue_name, [b"job"], declare=False)
    await eventually(lambda: len(calls) == 2, timeout=20, what="the retry")
    await queue_settles(rabbit, queue_name)


@pytest_twisted.ensureDeferred
async def test_the_documented_permissions_suffice_to_retry_and_park(
    rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """README's least-privilege regexes (default mode) let the service declare, retry and park, and nothing more."""
    user = f"{queue_name}-least"
    q = queue_name.replace(".", r"\.")
    await deferToThread(rabbit.add_user, user, "pw")
    await deferToThread(
        rabbit.set_permissions,
        "/",
        user,
        rf"^{q}(\.dead|\.retry\.[0-9]+s)?$",
        r"^amq\.default$",
        rf"^{q}(\.retry\.[0-9]+s)?$",
    )
    calls: list[int] = []
    retries: list[object] = []

    def fails_then_rejects(message: Message) -> None:
        calls.append(1)
        retries.append(message.headers.get("consumer-svc-retries"))
        if len(calls) == 1:
            raise RuntimeError("transient")
        raise Reject("permanent")

    run = services(
        settings_for(rabbit.url(user, "pw"), queue_name, retry_delay=1), fails_then_rejects
    )
    await run.consuming()
    await send(rabbit, queue_name, [b"job"], declare=False)
    await ready(rabbit, f"{queue_name}.dead", 1)
    # The second attempt came back through the retry queue, not as a hand-back.
    assert retries == [None, 1]
    assert run.exits == []


@pytest_twisted.ensureDeferred
async def test_copies_the_broker_refuses_neither_reconnect_nor_hold_back_the_rest(
    rabbit: RabbitNode, queue_name: str, services: Services, logs: Logs
) -> None:
    """No write permission for copies: each refused copy closes only the publishing channel, the message waits in its queue, good ones flow."""
    user = f"{queue_name}-nowrite"
    await deferToThread(rabbit.add_user, user, "pw")
    # Its queues exist and it may read, but write nowhere: every copy is refused (403).
    await deferToThread(rabbit.set_permissions, "/", user, "^$", "^$", ".*")
    await deferToThread(declare, rabbit.url(), queue_name)
    await deferToThread(declare, rabbit.url(), f"{queue_name}.dead")
    for delay in (1, 2, 5, 10, 20):
        name, arguments = retry_queue(queue_name, delay)
        await deferToThread(declare, rabbit.url(), name, arguments=arguments)
    good: list[bytes] = []

    def handler(message: Message) -> None:
        if message.body == b"bad":
            raise RuntimeError("always fails")
        good.append(message.body)

    run = services(
        settings_for(rabbit.url(user, "pw"), queue_name, prefetch=5, declare=False), handler
    )
    await run.consuming()
    await send(rabbit, queue_name, [b"bad", *(b"good-%d" % i for i in range(20))], declare=False)
    await eventually(lambda: len(good) == 20, timeout=30, what="every good message handled")
    # The bad one was refused at least twice (in full, then bare) and handed back, not lost.
    await eventually(
        lambda: sum("refused the copy of message" in line for line in logs.lines()) >= 2,
        timeout=20,
        what="the refusals logged",
    )
    assert run.exits == []
    exposition = run.service.metrics.render().decode()
    assert "consumer_connections_total 1.0" in exposition
    stats = (await deferToThread(rabbit.list_queues))[queue_name]
    assert stats.messages_ready + stats.messages_unacknowledged == 1
