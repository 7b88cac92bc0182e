"""When handlers fail, against a real broker: retries later, parking, and publishing from handlers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pika
import pytest
import pytest_twisted
from support.amqp_tools import connect, get_messages, publish
from support.logs import Logs
from support.service_support import Running, queue_settles, send, settings_for
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from consumer_svc import ExitStatus, Message, Reject, Retry
from consumer_svc._settings import Settings
from consumer_svc.testing.rabbitmq import RabbitNode

pytestmark = pytest.mark.brokers("3.10", "4.0")
Services = Callable[[Settings, Callable[[Message], Any]], Running]


def now() -> float:
    return float(reactor.seconds())


async def dead_letters(node: RabbitNode, queue: str, count: int, timeout: float = 20) -> list[Any]:
    await eventually(
        lambda: (node.list_queues().get(f"{queue}.dead") or _Empty).messages_ready == count,
        timeout=timeout,
        what=f"{count} message(s) in {queue}.dead",
        blocking=True,
    )
    return await deferToThread(get_messages, node.url(), f"{queue}.dead")


class _Empty:
    messages_ready = -1


@pytest_twisted.ensureDeferred
async def test_a_transient_failure_is_retried_later_and_then_acked(
    rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """A handler that fails twice gets the message again after the retry delays, then acks it; nothing is left anywhere."""
    seen: list[tuple[float, int]] = []

    def flaky(message: Message) -> None:
        retries = int(message.headers.get("consumer-svc-retries", 0))
        seen.append((now(), retries))
        if retries < 2:
            raise RuntimeError("database down")

    run = services(settings_for(rabbit.url(), queue_name, retry_delay=0.5, max_retries=3), flaky)
    await run.consuming()
    await send(rabbit, queue_name, [b"job"])
    await eventually(lambda: len(seen) == 3, timeout=20, what="two retries")
    await queue_settles(rabbit, queue_name)
    assert [retries for _, retries in seen] == [0, 1, 2]
    assert seen[1][0] - seen[0][0] >= 0.5  # first retry after the retry delay
    assert seen[2][0] - seen[1][0] >= 1.0  # the second waits twice as long
    queues = await deferToThread(rabbit.list_queues)
    assert all(
        q.messages_ready == q.messages_unacknowledged == 0
        for name, q in queues.items()
        if name.startswith(queue_name)
    )


@pytest_twisted.ensureDeferred
async def test_after_the_last_retry_the_message_is_parked_with_its_story(
    rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """Past --max-retries the message goes to <queue>.dead with its body, properties and headers, and why."""
    attempts: list[bytes] = []

    def broken(message: Message) -> None:
        attempts.append(message.body)
        raise ValueError("bad payload")

    run = services(settings_for(rabbit.url(), queue_name, retry_delay=0.1, max_retries=2), broken)
    await run.consuming()

    def publish_with_properties() -> None:
        connection = connect(rabbit.url())
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(
            content_type="application/json",
            message_id="order-7",
            delivery_mode=2,
            headers={"tenant": "acme"},
        )
        channel.basic_publish("", queue_name, b'{"order": 7}', properties, mandatory=True)
        connection.close()

    await deferToThread(publish_with_properties)
    [parked] = await dead_letters(rabbit, queue_name, 1)
    await queue_settles(rabbit, queue_name)
    assert attempts == [b'{"order": 7}'] * 3
    assert parked.body == b'{"order": 7}'
    assert parked.properties.content_type == "application/json"
    assert parked.properties.message_id == "order-7"
    headers = parked.properties.headers
    assert headers["tenant"] == "acme"
    assert headers["consumer-svc-failure"] == "ValueError: bad payload (gave up after 3 attempts)"
    assert headers["consumer-svc-attempts"] == 3
    assert headers["consumer-svc-original-exchange"] == ""
    assert headers["consumer-svc-original-routing-key"] == queue_name
    assert headers["consumer-svc-queue"] == queue_name
    assert headers["consumer-svc-failed-at"].endswith("Z")


@pytest_twisted.ensureDeferred
async def test_reject_and_undecodable_bodies_are_parked_at_once(
    rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """Reject, and a body that message.json() cannot decode, skip the retries."""
    calls: list[bytes] = []

    def strict(message: Message) -> None:
        calls.append(message.body)
        payload = message.json()
        if "task" not in payload:
            raise Reject("no task in the order")

    run = services(settings_for(rabbit.url(), queue_name), strict)
    await run.consuming()
    await send(rabbit, queue_name, [b"{not json", b'{"x": 1}', b'{"task": "ok"}'])
    parked = await dead_letters(rabbit, queue_name, 2)
    await queue_settles(rabbit, queue_name)
    assert sorted(calls) == sorted(
        [b"{not json", b'{"x": 1}', b'{"task": "ok"}']
    )  # one attempt each
    reasons = sorted(m.properties.headers["consumer-svc-failure"] for m in parked)
    assert reasons[0] == "Reject: no task in the order"
    assert reasons[1].startswith("UndecodableBody: body of message")


@pytest_twisted.ensureDeferred
async def test_retry_with_a_delay_of_its_own(
    rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """Retry(delay=1.5) brings the message back no sooner than 1.5 s later."""
    seen: list[float] = []

    def later(message: Message) -> None:
        seen.append(now())
        if len(seen) == 1:
            raise Retry("rate limited", delay=1.5)

    run = services(settings_for(rabbit.url(), queue_name), later)
    await run.consuming()
    await send(rabbit, queue_name, [b"call the API"])
    await eventually(lambda: len(seen) == 2, timeout=20, what="the retry")
    assert seen[1] - seen[0] >= 1.5
    await queue_settles(rabbit, queue_name)


@pytest_twisted.ensureDeferred
async def test_a_quorum_queue_retries_and_parks_too(
    rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """With x-queue-type=quorum the same retry and dead-letter flow works."""
    calls: list[int] = []

    def broken(message: Message) -> None:
        calls.append(1)
        raise RuntimeError("always")

    settings = settings_for(
        rabbit.url(),
        queue_name,
        retry_delay=0.1,
        max_retries=1,
        queue_arguments={"x-queue-type": "quorum"},
    )
    run = services(settings, broken)
    await run.consuming()
    await send(rabbit, queue_name, [b"q"], declare=False)
    await dead_letters(rabbit, queue_name, 1)
    assert len(calls) == 2


@pytest_twisted.ensureDeferred
async def test_a_mismatched_dead_letter_queue_stops_with_both_argument_sets(
    rabbit: RabbitNode, queue_name: str, services: Services, logs: Logs
) -> None:
    """If <queue>.dead exists with other arguments, the service says what it wanted and what the broker has, and exits 78."""
    await deferToThread(
        publish, rabbit.url(), f"{queue_name}.dead", [b"old"], queue_arguments={"x-max-length": 5}
    )
    run = services(settings_for(rabbit.url(), queue_name), lambda m: None)
    await eventually(lambda: run.exits != [], timeout=10, what="the fatal exit")
    assert run.exits == [ExitStatus.TOPOLOGY_MISMATCH]
    [line] = [line for line in logs.lines() if "Giving up" in line]
    assert f"queue '{queue_name}.dead' exists with other arguments: we declare {{}}" in line
    assert "x-max-length" in line


@pytest_twisted.ensureDeferred
async def test_consume_transform_publish_is_at_least_once(
    rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """A handler forwards each message; its message is acked only after the forward was confirmed."""
    out = f"{queue_name}-out"
    await send(rabbit, out, [], declare=True)

    def forward(message: Message) -> Any:
        return message.publish("", out, message.body.upper(), mandatory=True)

    run = services(settings_for(rabbit.url(), queue_name), forward)
    await run.consuming()
    await send(rabbit, queue_name, [b"a", b"b", b"c"])
    await queue_settles(rabbit, queue_name)
    await queue_settles(rabbit, out, ready=3)
    forwarded = await deferToThread(get_messages, rabbit.url(), out)
    assert sorted(m.body for m in forwarded) == [b"A", b"B", b"C"]
    await deferToThread(rabbit.delete_queue, out)


@pytest_twisted.ensureDeferred
async def test_an_unroutable_publish_fails_the_handler(
    rabbit: RabbitNode, queue_name: str, services: Services, logs: Logs
) -> None:
    """mandatory=True to a routing key no queue is bound to fails the handler, so the message is retried and parked."""

    def lost_forward(message: Message) -> None:
        message.publish("", f"{queue_name}-nowhere", b"x", mandatory=True)  # not even awaited

    run = services(
        settings_for(rabbit.url(), queue_name, retry_delay=0.1, max_retries=1), lost_forward
    )
    await run.consuming()
    await send(rabbit, queue_name, [b"m"])
    [parked] = await dead_letters(rabbit, queue_name, 1)
    assert parked.properties.headers["consumer-svc-failure"].startswith("PublishFailed: unroutable")
    assert "Unhandled error in Deferred" not in logs.text()


def rpc_call(url: str, queue: str, *, direct: bool, timeout: float = 20) -> Any:
    """Send a request as an RPC client does and wait (bounded) for its reply.

    The reply comes to a server-named exclusive queue (amq.gen-...), or with
    ``direct`` through RabbitMQ's direct reply-to; returns (body, properties).
    """
    connection = connect(url)
    try:
        channel = connection.channel()
        answers: list[tuple[bytes, Any]] = []
        if direct:
            reply_to = "amq.rabbitmq.reply-to"
        else:
            reply_to = channel.queue_declare("", exclusive=True).method.queue
        channel.basic_consume(
            reply_to, lambda ch, method, props, body: answers.append((body, props)), auto_ack=True
        )
        properties = pika.BasicProperties(reply_to=reply_to, correlation_id="c-42")
        channel.basic_publish("", queue, b"ping", properties)
        deadline = time.monotonic() + timeout
        while not answers and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.1)
        assert answers, f"no reply within {timeout} s"
        return answers[0]
    finally:
        connection.close()


@pytest.mark.parametrize("direct", [False, True], ids=["server-named queue", "direct reply-to"])
@pytest_twisted.ensureDeferred
async def test_a_reply_answers_an_rpc_request(
    rabbit: RabbitNode, queue_name: str, services: Services, direct: bool
) -> None:
    """message.reply() reaches the caller's server-named queue, or direct reply-to, with its correlation_id."""
    run = services(settings_for(rabbit.url(), queue_name), lambda m: m.reply(b"pong:" + m.body))
    await run.consuming()
    body, properties = await deferToThread(rpc_call, rabbit.url(), queue_name, direct=direct)
    assert body == b"pong:ping"
    assert properties.correlation_id == "c-42"
    await queue_settles(rabbit, queue_name)


@pytest_twisted.ensureDeferred
async def test_publishes_under_a_memory_alarm_fail_in_time_and_lose_nothing(
    fresh_rabbit: RabbitNode, queue_name: str, services: Services, logs: Logs
) -> None:
    """A blocked connection fails publishes after --publish-timeout instead of hanging; once the alarm clears all is forwarded."""
    out = f"{queue_name}-out"
    await send(fresh_rabbit, out, [])
    gate: Deferred[None] = Deferred()
    forwarded: list[bytes] = []

    async def forward(message: Message) -> None:
        if not gate.called:
            await gate
        await message.publish("", out, message.body, mandatory=True)
        forwarded.append(message.body)

    settings = settings_for(
        fresh_rabbit.url(), queue_name, publish_timeout=1.0, retry_delay=0.2, max_retries=100
    )
    run = services(settings, forward)
    await run.consuming()
    await send(fresh_rabbit, queue_name, [b"a", b"b", b"c"])
    await eventually(
        lambda: len(run.service.consumer.inflight) == 3, timeout=10, what="3 handlers waiting"
    )
    await deferToThread(fresh_rabbit.set_memory_alarm, True)
    try:
        gate.callback(None)
        await eventually(
            lambda: run.service.blocked, timeout=20, what="the blocked connection noticed"
        )
        await eventually(
            lambda: (
                "no confirm from the broker within 1s (the broker has blocked the connection)"
                in logs.text()
            ),
            timeout=20,
            what="a publish failed in time",
        )
        assert "The broker blocked the connection" in logs.text()
    finally:
        await deferToThread(fresh_rabbit.set_memory_alarm, False)
    await eventually(
        lambda: set(forwarded) == {b"a", b"b", b"c"}, timeout=30, what="every message forwarded"
    )
    await queue_settles(fresh_rabbit, queue_name, timeout=30)
    await eventually(lambda: not run.service.blocked, timeout=20, what="unblocked")
    assert run.exits == []
