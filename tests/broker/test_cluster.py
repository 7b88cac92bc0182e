"""A three-node cluster: two service instances on a quorum work queue while nodes crash, stop and restart.

Nothing may be lost, and consumption may never stop while a majority of the nodes is up:
the work queue, its retry queues and its dead-letter queue are all quorum queues, so no
queue the service owns is pinned to the node that goes down.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
import pytest
import pytest_twisted
from support.amqp_tools import get_messages
from support.service_support import Running, settings_for
from support.waiting import eventually
from twisted.internet.threads import deferToThread

from consumer_svc import Message, Reject, Retry
from consumer_svc._settings import Settings
from consumer_svc._url import parse_url
from consumer_svc.testing.rabbitmq import RabbitCluster

Services = Callable[[Settings, Callable[[Message], Any]], Running]

pytestmark = pytest.mark.brokers("3.10", "4.0")

QUORUM = {"x-queue-type": "quorum"}


class Feed:
    """Publishes numbered messages at a steady pace with confirms, failing over between nodes."""

    def __init__(self, urls: list[str], queue: str, count: int, pace: float = 0.01) -> None:
        self.urls, self.queue, self.count, self.pace = urls, queue, count, pace
        self.confirmed: set[bytes] = set()
        self.failovers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Feed:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @property
    def done(self) -> bool:
        return len(self.confirmed) == self.count

    def _connect(self, attempt: int) -> Any:
        params = pika.URLParameters(self.urls[attempt % len(self.urls)])
        params.connection_attempts = 1
        params.socket_timeout = params.stack_timeout = params.blocked_connection_timeout = 5
        channel = pika.BlockingConnection(params).channel()
        channel.confirm_delivery()
        return channel

    def _run(self) -> None:
        attempt, channel = 0, None
        number = 0
        deadline = time.monotonic() + 240
        while number < self.count and not self._stop.is_set() and time.monotonic() < deadline:
            body = b"%05d" % number
            try:
                if channel is None:
                    channel = self._connect(attempt)
                channel.basic_publish(
                    "", self.queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True
                )
            except Exception:  # a node went down under us: publish the same one elsewhere
                attempt += 1
                self.failovers += 1
                channel = None
                time.sleep(0.2)
                continue
            self.confirmed.add(body)
            number += 1
            time.sleep(self.pace)
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.connection.close()


class Ledger:
    """What the two instances did: when each message was handled, and how it ended."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.succeeded: set[bytes] = set()
        self.attempts: dict[bytes, int] = {}

    def handler(self, message: Message) -> None:
        self.times.append(time.monotonic())
        body = message.body
        self.attempts[body] = self.attempts.get(body, 0) + 1
        number = int(body)
        if number % 10 == 3:
            raise Reject("parked on purpose")
        if number % 10 == 7 and self.attempts[body] == 1:
            raise Retry("fails once, retried through a retry queue", delay=1)
        self.succeeded.add(body)

    def handled_since(self, since: float) -> int:
        return sum(1 for t in self.times if t >= since)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without any message handled between ``start`` and ``end``."""
        marks = [start, *sorted(t for t in self.times if start <= t <= end), end]
        return max(b - a for a, b in zip(marks, marks[1:]))


def instance_settings(cluster: RabbitCluster, queue: str, first: int) -> Settings:
    """Settings for an instance that starts on node ``first`` and knows every node."""
    urls = cluster.urls()
    ordered = urls[first:] + urls[:first]
    return settings_for(
        ordered[0],
        queue,
        urls=tuple(parse_url(u) for u in ordered),
        queue_arguments=QUORUM,
        prefetch=5,
        retry_delay=1,
        max_retries=3,
        heartbeat=2,
        connect_timeout=3,
    )


@pytest.mark.timeout(600)
@pytest_twisted.ensureDeferred
async def test_two_instances_lose_nothing_and_never_stop_while_nodes_crash_stop_and_restart(
    rabbit_cluster: RabbitCluster, queue_name: str, services: Services
) -> None:
    """kill -9 of a node, each node stopped in turn, then a rolling restart: 0 lost, no long stall."""
    ledger = Ledger()
    runs = [
        services(instance_settings(rabbit_cluster, queue_name, first), ledger.handler)
        for first in (0, 1)
    ]
    for run in runs:
        await run.consuming(timeout=60)
    placement = await deferToThread(rabbit_cluster.list_queues)
    owned = [name for name in placement if name.startswith(queue_name)]
    # The work queue, the dead-letter queue and the schedule's retry rungs (1, 2, 5 s).
    assert len(owned) == 5
    for name in owned:
        assert placement[name].type == "quorum", name
        assert len(placement[name].members) == 3, name

    feed = Feed(rabbit_cluster.urls(), queue_name, count=3000, pace=0.02).start()
    try:
        started = time.monotonic()
        gaps: dict[str, float] = {}

        async def while_down(what: str, down: Callable[[], None], up: Callable[[], None]) -> None:
            await deferToThread(down)
            since = time.monotonic()
            # Consumption goes on while the node is down: fresh messages are handled.
            await eventually(
                lambda: ledger.handled_since(since) >= 20,
                timeout=30,
                what=f"messages handled while {what}",
            )
            await deferToThread(up)
            gaps[what] = ledger.longest_gap(since, time.monotonic())
            print(f"\n{what}: back after {time.monotonic() - since:.1f} s", flush=True)

        cluster = rabbit_cluster
        await while_down(
            "node 0 is killed",
            functools.partial(cluster.kill_node, 0),
            functools.partial(cluster.start_node, 0),
        )
        for index in (1, 2):
            await while_down(
                f"node {index} is stopped",
                functools.partial(cluster.stop_node, index),
                functools.partial(cluster.start_node, index),
            )
        since = time.monotonic()
        await deferToThread(rabbit_cluster.rolling_restart)
        gaps["rolling restart"] = ledger.longest_gap(since, time.monotonic())
        await eventually(lambda: feed.done, timeout=180, what="every message published")
    finally:
        feed.stop()

    parkable = {body for body in feed.confirmed if int(body) % 10 == 3}
    await eventually(
        lambda: feed.confirmed - parkable <= ledger.succeeded,
        timeout=90,
        what="every message handled",
    )
    parked: set[bytes] = set()

    async def all_parked() -> bool:
        messages = await deferToThread(get_messages, rabbit_cluster.url(0), f"{queue_name}.dead")
        parked.update(m.body for m in messages)
        return parkable <= parked

    await eventually(all_parked, timeout=60, what="every rejected message parked")
    lost = feed.confirmed - ledger.succeeded - parked
    print(
        f"\ncluster ({rabbit_cluster[0].version}): {len(feed.confirmed)} published, "
        f"{feed.failovers} publisher failovers, lost {len(lost)}, "
        f"longest gaps without a handled message: "
        + ", ".join(f"{what} {gap:.1f} s" for what, gap in gaps.items())
        + f"; {time.monotonic() - started:.0f} s"
    )
    assert lost == set()
    for what, gap in gaps.items():
        assert gap < 30, f"consumption stalled {gap:.1f} s while {what}"
    assert all(run.exits == [] for run in runs)
