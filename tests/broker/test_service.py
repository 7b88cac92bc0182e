"""The service in this process against a real broker node: consuming, recovering, refusing.

Each test runs a `ConsumerService` in pytest-twisted's reactor against the
session's throwaway RabbitMQ node, and waits with deadlines only.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
from support import amqp_tools
from support.logs import Logs
from support.service_support import (
    Recorder,
    queue_settles,
    ready_and_unacked,
    send,
    settings_for,
    sleep,
)
from support.waiting import eventually
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

import consumer_svc
from consumer_svc import ExitStatus, Message
from consumer_svc._frames import READ_SIZE, FrameReader
from consumer_svc._states import State
from consumer_svc._url import parse_url
from consumer_svc.testing.rabbitmq import RabbitNode

pytestmark = pytest.mark.brokers("3.10", "4.0")

# -- consuming


@pytest_twisted.ensureDeferred
async def test_every_message_is_handled_and_acked(
    rabbit: RabbitNode, queue_name: str, services: Any
) -> None:
    """Published messages are each handled once and acked; the queue ends empty."""
    handler = Recorder()
    run = services(settings_for(rabbit.url(), queue_name), handler)
    await run.consuming()
    bodies = [b"m%d" % i for i in range(50)]
    await send(rabbit, queue_name, bodies)
    await eventually(lambda: len(handler.bodies) == 50, timeout=20, what="50 messages handled")
    await queue_settles(rabbit, queue_name)
    assert handler.count() == Counter(bodies)
    # Acks are small writes: the socket sends them without waiting for Nagle, as pika's own do.
    connection = run.service._connection
    assert connection is not None
    assert connection.transport.getTcpNoDelay()


@pytest_twisted.ensureDeferred
async def test_bodies_of_every_size_arrive_intact(
    rabbit: RabbitNode, queue_name: str, services: Any
) -> None:
    """Bodies that span socket reads and frames (frame_max 128 KiB) arrive byte for byte."""
    handler = Recorder()
    run = services(settings_for(rabbit.url(), queue_name), handler)
    await run.consuming()
    sizes = [0, 1, 100, 65_536, 65_536 + 17, 131_072, 262_144 + 3, 1_000_003] * 3
    bodies = [bytes([i % 251]) * 7 + bytes(range(256)) * (size // 256) + b"e" * (size % 256)
              for i, size in enumerate(sizes)]  # fmt: skip
    await send(rabbit, queue_name, bodies)
    await eventually(
        lambda: len(handler.bodies) == len(bodies), timeout=30, what="every body handled"
    )
    await queue_settles(rabbit, queue_name)
    assert handler.count() == Counter(bodies)
    connection = run.service._connection
    assert connection is not None
    assert isinstance(connection._impl._on_data_available, FrameReader)
    assert connection.transport.bufferSize == READ_SIZE


@pytest_twisted.ensureDeferred
async def test_up_to_prefetch_messages_are_handled_at_once(
    rabbit: RabbitNode, queue_name: str, services: Any
) -> None:
    """With prefetch 3, three handlers run concurrently and a fourth waits for one to finish."""
    gates: list[Deferred[None]] = []

    def held(message: Message) -> Deferred[None]:
        gate: Deferred[None] = Deferred()
        gates.append(gate)
        return gate

    run = services(settings_for(rabbit.url(), queue_name, prefetch=3), Recorder(held))
    await run.consuming()
    await send(rabbit, queue_name, [b"a", b"b", b"c", b"d", b"e"])
    await eventually(lambda: len(gates) == 3, timeout=10, what="3 handlers running")
    await eventually(
        lambda: ready_and_unacked(rabbit, queue_name) == (2, 3),
        timeout=10,
        what="2 ready, 3 unacked",
        blocking=True,
    )
    assert len(gates) == 3  # the broker holds back the rest: QoS is per consumer
    gates[0].callback(None)
    await eventually(lambda: len(gates) == 4, timeout=10, what="a 4th handler after one finished")
    for gate in gates[1:]:
        gate.callback(None)
    await eventually(lambda: len(gates) == 5, timeout=10, what="the 5th handler")
    gates[4].callback(None)
    await queue_settles(rabbit, queue_name)


@pytest_twisted.ensureDeferred
async def test_deferred_coroutine_and_blocking_handlers(
    rabbit: RabbitNode, queue_name: str, services: Any
) -> None:
    """All three kinds of handler have their messages acked once they finish."""
    seen: list[tuple[str, bytes]] = []

    def deferred_handler(message: Message) -> Deferred[None]:
        return task.deferLater(reactor, 0.01, seen.append, ("deferred", message.body))

    async def coroutine_handler(message: Message) -> None:
        await sleep(0.01)
        seen.append(("coroutine", message.body))

    @consumer_svc.blocking
    def blocking_handler(message: Message) -> None:
        time.sleep(0.01)
        seen.append(("blocking", message.body))

    for kind, handler in (
        ("deferred", deferred_handler),
        ("coroutine", coroutine_handler),
        ("blocking", blocking_handler),
    ):
        queue = f"{queue_name}-{kind}"
        run = services(settings_for(rabbit.url(), queue), handler)
        await run.consuming()
        await send(rabbit, queue, [b"1", b"2", b"3"])
        await queue_settles(rabbit, queue)
        assert sorted(body for k, body in seen if k == kind) == [b"1", b"2", b"3"]
        await run.stop()
        await deferToThread(rabbit.delete_queue, queue)


@pytest_twisted.ensureDeferred
async def test_replies_go_only_where_replies_belong(
    rabbit: RabbitNode, queue_name: str, services: Any
) -> None:
    """A reply_to naming an ordinary queue gets nothing and the request is parked; --reply-to-allow lets the reply through."""
    other, dead = f"{queue_name}-payments", f"{queue_name}.dead"
    await deferToThread(amqp_tools.declare, rabbit.url(), other)
    try:
        run = services(settings_for(rabbit.url(), queue_name), Recorder(lambda m: m.reply(b"pong")))
        await run.consuming()
        await send(rabbit, queue_name, [b"ping"], reply_to=other)
        await queue_settles(rabbit, dead, ready=1)
        assert ready_and_unacked(rabbit, other) == (0, 0)
        await run.stop()
        allowing = settings_for(rabbit.url(), queue_name, reply_to_allow=(f"{queue_name}-pay*",))
        run = services(allowing, Recorder(lambda m: m.reply(b"pong")))
        await run.consuming()
        await send(rabbit, queue_name, [b"ping"], reply_to=other)
        await queue_settles(rabbit, other, ready=1)
        await queue_settles(rabbit, queue_name)
        assert await deferToThread(amqp_tools.get_all, rabbit.url(), other) == [b"pong"]
    finally:
        for queue in (other, dead):
            await deferToThread(amqp_tools.delete, rabbit.url(), queue)


@pytest_twisted.ensureDeferred
async def test_the_queue_is_bound_to_a_declared_exchange(
    rabbit: RabbitNode, queue_name: str, services: Any
) -> None:
    """With --exchange and --routing-key, messages published to the exchange reach the handler."""
    handler = Recorder()
    exchange = f"{queue_name}-ex"
    settings = settings_for(
        rabbit.url(), queue_name, exchange=exchange, exchange_type="topic", routing_keys=("jobs.*",)
    )
    run = services(settings, handler)
    await run.consuming()
    await send(rabbit, "jobs.print", [b"routed"], exchange=exchange, declare=False)
    await eventually(lambda: handler.bodies == [b"routed"], timeout=10, what="the routed message")


@pytest_twisted.ensureDeferred
async def test_a_blocking_handler_does_not_cost_the_heartbeat(
    rabbit: RabbitNode, queue_name: str, services: Any
) -> None:
    """A @blocking handler busy for several heartbeat intervals keeps its connection and is acked once.

    The seed's "missed heartbeats from client": with a 1 s heartbeat the broker
    would drop a client whose reactor is blocked for 6 s.
    """

    def slow(message: Message) -> None:
        time.sleep(6)

    handler = consumer_svc.blocking(Recorder(slow))
    run = services(settings_for(rabbit.url(), queue_name, heartbeat=1), handler)
    await run.consuming()
    connection = run.service._connection
    await send(rabbit, queue_name, [b"long job"])
    await queue_settles(rabbit, queue_name, timeout=30)
    assert handler.bodies == [b"long job"]
    assert handler.redelivered == [False]
    assert run.service._connection is connection
    assert run.service.state is State.CONSUMING


# -- recovering (a broker restart, forced closes and a deleted queue are test_faults.py's,
# which also bounds the duplicates and times the recovery)


@pytest_twisted.ensureDeferred
async def test_with_no_declare_a_missing_queue_is_awaited(
    rabbit: RabbitNode, queue_name: str, services: Any, logs: Logs
) -> None:
    """--no-declare on a missing queue retries with backoff, saying why, and consumes once it appears."""
    handler = Recorder()
    run = services(settings_for(rabbit.url(), queue_name, declare=False), handler)
    await eventually(
        lambda: "does not exist (--no-declare)" in logs.text(), timeout=10, what="the reason logged"
    )
    assert run.exits == []
    await send(rabbit, queue_name, [b"finally"])  # declares the queue
    await run.consuming()
    await eventually(lambda: handler.bodies == [b"finally"], timeout=10, what="the message")


# -- refusing


@pytest_twisted.ensureDeferred
async def test_wrong_credentials_exit_with_one_clear_line(
    rabbit: RabbitNode, queue_name: str, services: Any, logs: Logs
) -> None:
    """A refused login names ACCESS_REFUSED and the user, never the password, and exits 77."""
    url = rabbit.url(user="guest", password="wrong-pa55word")
    run = services(settings_for(url, queue_name), Recorder())
    await eventually(lambda: run.exits != [], timeout=10, what="the fatal exit")
    assert run.exits == [ExitStatus.ACCESS_REFUSED]
    [line] = [line for line in logs.lines() if "Giving up" in line]
    assert "ACCESS_REFUSED" in line
    assert "'guest'" in line
    assert "wrong-pa55word" not in logs.text()
    assert run.service.state is State.FAILED


@pytest_twisted.ensureDeferred
async def test_an_unknown_vhost_exits_with_one_clear_line(
    rabbit: RabbitNode, queue_name: str, services: Any, logs: Logs
) -> None:
    """A vhost that does not exist is named, and the service exits 77 instead of retrying."""
    run = services(settings_for(rabbit.url(vhost="no-such-vhost"), queue_name), Recorder())
    await eventually(lambda: run.exits != [], timeout=10, what="the fatal exit")
    assert run.exits == [ExitStatus.ACCESS_REFUSED]
    [line] = [line for line in logs.lines() if "Giving up" in line]
    assert "no-such-vhost" in line


@pytest_twisted.ensureDeferred
async def test_mismatched_queue_arguments_exit_and_lose_nothing(
    rabbit: RabbitNode, queue_name: str, services: Any, logs: Logs
) -> None:
    """A queue declared elsewhere with other arguments stops the service with exit 78; its messages stay."""
    await send(rabbit, queue_name, [b"keep me"], queue_arguments={"x-max-length": 10})
    settings = settings_for(rabbit.url(), queue_name, queue_arguments={"x-max-length": 99})
    run = services(settings, Recorder())
    await eventually(lambda: run.exits != [], timeout=10, what="the fatal exit")
    assert run.exits == [ExitStatus.TOPOLOGY_MISMATCH]
    [line] = [line for line in logs.lines() if "Giving up" in line]
    assert "PRECONDITION_FAILED" in line
    assert "x-max-length" in line
    await queue_settles(rabbit, queue_name, ready=1)


@pytest_twisted.ensureDeferred
async def test_a_cluster_node_going_down_moves_the_consumer(
    rabbit: RabbitNode, rabbit_factory: Any, queue_name: str, services: Any, logs: Logs
) -> None:
    """With two broker URLs and the first one down, the service consumes from the second, and back when that one goes."""
    other = rabbit_factory(start=False)
    handler = Recorder()
    settings = settings_for(other.url(), queue_name, reconnect_max=1.0)
    settings = dataclasses.replace(settings, urls=(settings.url, parse_url(rabbit.url())))
    run = services(settings, handler)
    await run.consuming()
    assert f"127.0.0.1:{rabbit.amqp_port}" in str(run.service.factory.url)
    await send(rabbit, queue_name, [b"from the second node"])
    await eventually(
        lambda: handler.bodies == [b"from the second node"], timeout=10, what="a message"
    )
    await deferToThread(other.start)
    await deferToThread(rabbit.stop_app)
    try:
        await eventually(
            lambda: (
                run.service.factory.url.port == other.amqp_port
                and run.service.state is State.CONSUMING
            ),
            timeout=30,
            what="moved to the first node",
        )
        await send(other, queue_name, [b"from the first node"])
        await eventually(lambda: len(handler.bodies) == 2, timeout=10, what="the second message")
    finally:
        await deferToThread(rabbit.start_app)


@pytest_twisted.ensureDeferred
async def test_an_invalid_queue_argument_value_is_named_as_such(
    rabbit: RabbitNode, queue_name: str, services: Any, logs: Logs
) -> None:
    """A --queue-arg value the broker refuses is reported as an invalid value (exit 64), not as a queue with other arguments."""
    settings = settings_for(rabbit.url(), queue_name, queue_arguments={"x-max-length": "lots"})
    run = services(settings, Recorder())
    await eventually(lambda: run.exits != [], timeout=10, what="the fatal exit")
    assert run.exits == [ExitStatus.CONFIG]
    [line] = [line for line in logs.lines() if "Giving up" in line]
    assert "--queue-arg x-max-length='lots' is not a valid value for x-max-length" in line
    assert "invalid arg 'x-max-length'" in line
    assert "other arguments" not in line
