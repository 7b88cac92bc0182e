"""Headers RabbitMQ accepts and pika alone cannot decode, through the running service and a real broker."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from support import hostile
from support.service_support import Running, queue_settles, settings_for
from support.waiting import eventually
from twisted.internet.threads import deferToThread

from consumer_svc import Message, Retry
from consumer_svc._codec import LATEST, MAX_DEPTH, TooDeep
from consumer_svc._settings import Settings
from consumer_svc.testing.rabbitmq import RabbitNode

Services = Callable[[Settings, Callable[[Message], Any]], Running]

pytestmark = pytest.mark.brokers("3.10", "4.0")

HOSTILE: dict[bytes, dict[Any, Any]] = {
    b"far-future": {"at": hostile.timestamp(2**63)},
    b"deep-array": {"a": hostile.nested(1000, "A"), "after": "kept"},
    b"deep-table": {"t": hostile.nested(1000, "F"), "after": "kept"},
    b"floats": {"ratio": 0.25, "f32": hostile.Float32(1.5)},
    b"not-utf8": {b"\xffkey": "value"},
}


def publish_all(url: str, queue: str) -> None:
    """20 good messages with the hostile ones among them, all confirmed by the broker."""
    hostile_ones = iter(HOSTILE.items())
    with hostile.Publisher(url) as publisher:
        for i in range(20):
            publisher.publish(queue, f"good-{i}".encode(), headers={"n": i})
            if i % 4 == 1:
                body, headers = next(hostile_ones)
                publisher.publish(queue, body, headers=headers, message_id=body.decode())


def depth_of(value: Any) -> tuple[int, Any]:
    depth = 0
    while isinstance(value, (list, dict)):
        value = value[0] if isinstance(value, list) else value["n"]
        depth += 1
    return depth, value


def connections(run: Running) -> int:
    """The service's consumer_connections_total metric."""
    found = re.search(
        r"^consumer_connections_total (\S+)$", run.service.metrics.render().decode(), re.M
    )
    assert found is not None
    return int(float(found.group(1)))


@pytest_twisted.ensureDeferred
async def test_hostile_headers_reach_the_handler_without_a_reconnect(
    rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """Hostile headers among 20 good messages: one connection, all handled and acked, values clamped or marked, and a retried copy re-encodes them."""
    seen: dict[bytes, list[dict[str, Any]]] = {}

    def handler(message: Message) -> None:
        seen.setdefault(message.body, []).append(dict(message.headers))
        # Fail each hostile message once: its copy in the retry queue carries
        # the decoded headers, so they must encode again.
        if message.body in HOSTILE and "consumer-svc-retries" not in message.headers:
            raise Retry("once, to republish the headers")

    run = services(settings_for(rabbit.url(), queue_name, retry_delay=0.2), handler)
    await run.consuming()
    await deferToThread(publish_all, rabbit.url(), queue_name)

    def all_handled() -> bool:
        good = all(f"good-{i}".encode() in seen for i in range(20))
        return good and all(len(seen.get(body, ())) == 2 for body in HOSTILE)

    await eventually(all_handled, timeout=30, what="every message handled (hostile ones twice)")
    await queue_settles(rabbit, queue_name)

    assert connections(run) == 1
    assert "Lost the connection" not in run.logs.text()
    assert all(seen[f"good-{i}".encode()] == [{"n": i}] for i in range(20))
    for first, retried in [seen[body] for body in HOSTILE]:
        assert retried["consumer-svc-retries"] == 1
        # Re-encoded by us, dead-lettered back by the broker (which adds x-death): the same values.
        assert {key: retried[key] for key in first} == first

    assert seen[b"far-future"][0] == {"at": LATEST}
    for body, key, marker in ((b"deep-array", "a", "<array"), (b"deep-table", "t", "<table")):
        headers = seen[body][0]
        depth, innermost = depth_of(headers[key])
        assert depth == MAX_DEPTH
        assert isinstance(innermost, TooDeep)
        assert innermost.startswith(marker)
        assert headers["after"] == "kept"
    for floats in seen[b"floats"]:  # as published, then as we re-encoded them
        assert (floats["ratio"], floats["f32"]) == (0.25, 1.5)
        assert type(floats["ratio"]) is type(floats["f32"]) is float
    assert seen[b"not-utf8"][0] == {"\udcffkey": "value"}
