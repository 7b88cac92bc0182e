"""Faults on purpose: each one is survived unattended, and nothing published is lost.

Every test publishes with confirms, breaks something while the service
consumes, and checks that each message was handled at least once and ended
acked, that duplicates stay within the in-flight window, and that the service
never gave up. The times to detect and to resume go into the reliability
table printed at the end of the run (README.md, "Reliability").
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from support.faultproxy import FaultProxy
from support.logs import Logs
from support.service_support import (
    Figures,
    Running,
    Workload,
    event_time,
    queue_settles,
    send,
    settings_for,
    sleep,
)
from support.waiting import eventually, poll_until, within
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from consumer_svc import Message
from consumer_svc._settings import Settings
from consumer_svc._states import State
from consumer_svc.testing.rabbitmq import RabbitNode

pytestmark = pytest.mark.brokers("3.10", "4.0")
Services = Callable[[Settings, Callable[[Message], Any]], Running]
LOSS = ("Lost the connection", "Lost the consumer")
TICK = "[{rabbit, [{channel_tick_interval, 500}]}]."


def proxy_url(proxy: FaultProxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"


def now() -> float:
    return float(reactor.seconds())


def slow_recorder(work: Workload, seconds: float) -> Callable[[Message], Deferred[None]]:
    def handle(message: Message) -> Deferred[None]:
        work.record(message)
        return sleep(seconds)

    return handle


async def consumed_all(work: Workload, timeout: float = 60) -> None:
    await eventually(work.done, timeout=timeout, what=f"all {len(work.bodies)} messages handled")


def assert_survived(
    run: Running,
    work: Workload,
    prefetch: int,
    losses: int = 1,
    retries: int = 0,
    *,
    broker_crashed: bool = False,
) -> None:
    """Nothing lost; each lost channel redelivered at most its in-flight window; no exit.

    After a broker crash (kill -9) the window bound does not hold: RabbitMQ
    writes acks to disk lazily, so messages acked just before the crash come
    back. Those duplicates are the broker's, and counted all the same.
    """
    story = "\n".join(line for line in run.logs.lines() if "consumer_svc#" in line)
    assert work.lost == 0, story
    if not broker_crashed:
        assert work.duplicates <= prefetch * losses + retries, story
    assert run.exits == [], story
    assert run.service.state is State.CONSUMING, story


def record(
    figures: Figures,
    logs: Logs,
    fault: str,
    work: Workload,
    *,
    broke: float,
    healed: float | None = None,
) -> None:
    """Add the fault's row to the reliability table: when the loss was noticed, when consuming resumed.

    Resuming counts from ``healed`` (the broker call that ended the fault returned; the
    service may already consume by then) or, for faults that end by themselves, from the
    moment the loss was noticed.
    """
    detected = event_time(logs, broke, *LOSS)
    assert detected is not None
    resumed = event_time(logs, detected, "Consuming queue")
    assert resumed is not None
    figures.add(
        fault,
        work,
        detected=detected - broke,
        resumed=max(0.0, resumed - (detected if healed is None else healed)),
    )


@pytest_twisted.ensureDeferred
async def test_broker_app_restart(
    rabbit: RabbitNode, queue_name: str, services: Services, logs: Logs, figures: Figures
) -> None:
    """Seed "Test Broker Restart": the broker's app restarts mid-stream; all messages are handled."""
    work, prefetch = Workload(300), 20
    run = services(
        settings_for(rabbit.url(), queue_name, prefetch=prefetch), slow_recorder(work, 0.005)
    )
    await run.consuming()
    await send(rabbit, queue_name, work.bodies)
    await eventually(lambda: len(work.handled) >= 50, timeout=20, what="50 handled first")
    broke = now()
    await deferToThread(rabbit.restart_app)
    healed = now()
    await consumed_all(work)
    await queue_settles(rabbit, queue_name, timeout=30)
    assert_survived(run, work, prefetch)
    record(
        figures, logs, "broker app restart (stop_app/start_app)", work, broke=broke, healed=healed
    )


@pytest_twisted.ensureDeferred
async def test_broker_node_killed_and_restarted(
    fresh_rabbit: RabbitNode, queue_name: str, services: Services, logs: Logs, figures: Figures
) -> None:
    """The node is killed with kill -9 and started again; durable queue, persistent messages, nothing lost."""
    work, prefetch = Workload(300), 20
    run = services(
        settings_for(fresh_rabbit.url(), queue_name, prefetch=prefetch), slow_recorder(work, 0.005)
    )
    await run.consuming()
    await send(fresh_rabbit, queue_name, work.bodies)
    await eventually(lambda: len(work.handled) >= 50, timeout=20, what="50 handled first")
    broke = now()
    await deferToThread(fresh_rabbit.kill)
    await eventually(
        lambda: run.service.state is not State.CONSUMING, timeout=15, what="the loss noticed"
    )
    await deferToThread(fresh_rabbit.start)
    healed = now()
    await consumed_all(work)
    await queue_settles(fresh_rabbit, queue_name, timeout=30)
    assert_survived(run, work, prefetch, broker_crashed=True)
    record(figures, logs, "broker node kill -9, then started", work, broke=broke, healed=healed)


@pytest_twisted.ensureDeferred
async def test_connection_force_closed_again_and_again(
    rabbit: RabbitNode, queue_name: str, services: Services, logs: Logs, figures: Figures
) -> None:
    """CONNECTION_FORCED five times in a row, mid-stream: the service comes back each time."""
    work, prefetch = Workload(400), 10
    run = services(
        settings_for(rabbit.url(), queue_name, prefetch=prefetch), slow_recorder(work, 0.005)
    )
    await run.consuming()
    await send(rabbit, queue_name, work.bodies)
    detects, resumes = [], []
    for _ in range(5):
        await run.consuming()
        broke = now()
        await deferToThread(rabbit.close_all_connections, "chaos")
        await eventually(
            lambda: run.service.state is not State.CONSUMING, timeout=10, what="the close noticed"
        )
        await run.consuming()
        detected, resumed = (
            event_time(logs, broke, *LOSS),
            event_time(logs, broke, "Consuming queue"),
        )
        assert detected is not None
        assert resumed is not None
        detects.append(detected - broke)
        resumes.append(resumed - detected)
    await consumed_all(work)
    await queue_settles(rabbit, queue_name)
    assert_survived(run, work, prefetch, losses=5)
    assert "CONNECTION_FORCED" in logs.text()
    assert "chaos" in logs.text()  # the reason the broker gave is logged with the cause
    figures.add(
        "connection force-closed (CONNECTION_FORCED), 5 times",
        work,
        detected=max(detects),
        resumed=max(resumes),
    )


@pytest_twisted.ensureDeferred
async def test_a_handler_that_blocks_the_reactor(
    rabbit: RabbitNode, queue_name: str, services: Services, logs: Logs, figures: Figures
) -> None:
    """Seed "Test Heartbeat Timeout": a plain time.sleep in a non-blocking handler costs the connection.

    The broker drops the connection for missed heartbeats, the service recovers, the message is
    redelivered and handled, and a warning names the handler and the stall.
    """
    work = Workload(3)

    def sleepy(message: Message) -> None:
        work.record(message)
        if message.body == b"m1" and not message.redelivered:
            time.sleep(8)  # the mistake: blocks the reactor past 2 heartbeat intervals

    run = services(settings_for(rabbit.url(), queue_name, heartbeat=2, prefetch=1), sleepy)
    await run.consuming()
    broke = now()
    await send(rabbit, queue_name, work.bodies)
    await consumed_all(work, timeout=60)
    await queue_settles(rabbit, queue_name, timeout=30)
    assert work.handled[b"m1"] == 2  # redelivered after the lost connection
    assert_survived(run, work, prefetch=1)
    stall = [line for line in logs.lines() if "blocked the reactor" in line]
    assert stall
    assert "test_faults.sleepy" in stall[0] or "sleepy" in stall[0]
    record(figures, logs, "handler blocks the reactor 8 s (heartbeat 2 s)", work, broke=broke)


@pytest_twisted.ensureDeferred
async def test_queue_deleted_under_the_consumer(
    rabbit: RabbitNode, queue_name: str, services: Services, logs: Logs, figures: Figures
) -> None:
    """The broker's basic.cancel for a deleted queue: re-declared, and what is published afterwards is consumed."""
    work = Workload(20)
    run = services(settings_for(rabbit.url(), queue_name), slow_recorder(work, 0))
    await run.consuming()
    broke = now()
    await deferToThread(rabbit.delete_queue, queue_name)
    await eventually(lambda: event_time(logs, broke, *LOSS), timeout=10, what="the cancel noticed")
    await run.consuming()
    await send(rabbit, queue_name, work.bodies, declare=False)
    await consumed_all(work)
    assert_survived(run, work, prefetch=10)
    assert "the broker cancelled the consumer" in logs.text()
    record(figures, logs, "queue deleted (broker basic.cancel)", work, broke=broke)


@pytest_twisted.ensureDeferred
async def test_channel_closed_by_a_channel_error(
    rabbit: RabbitNode, queue_name: str, services: Services, logs: Logs, figures: Figures
) -> None:
    """A 406 closes the channel while the connection stays up: noticed, and consumption resumes."""
    work, prefetch = Workload(200), 10
    run = services(
        settings_for(rabbit.url(), queue_name, prefetch=prefetch), slow_recorder(work, 0.01)
    )
    await run.consuming()
    await send(rabbit, queue_name, work.bodies)
    await eventually(lambda: len(work.handled) >= 20, timeout=20, what="20 handled first")
    channel = run.service.consumer.channel
    assert channel is not None
    broke = now()
    channel.ack(987654321)  # an unknown delivery tag: 406 PRECONDITION_FAILED, channel closed
    await eventually(
        lambda: "PRECONDITION_FAILED" in logs.text(), timeout=10, what="the channel error logged"
    )
    await consumed_all(work)
    await queue_settles(rabbit, queue_name)
    assert_survived(run, work, prefetch)
    record(figures, logs, "channel closed by a channel error (406)", work, broke=broke)


@pytest_twisted.ensureDeferred
async def test_the_brokers_delivery_acknowledgement_timeout(
    rabbit_factory: Callable[..., RabbitNode],
    queue_name: str,
    services: Services,
    logs: Logs,
    figures: Figures,
) -> None:
    """A handler slower than the broker's consumer_timeout: the closed channel is noticed and the message redelivered."""
    node = await deferToThread(rabbit_factory, "consumer_timeout = 2000", advanced=TICK)
    work = Workload(2)

    def slow_first_time(message: Message) -> Deferred[None]:
        work.record(message)
        return sleep(5 if message.body == b"m0" and not message.redelivered else 0)

    run = services(settings_for(node.url(), queue_name, prefetch=2), slow_first_time)
    await run.consuming()
    broke = now()
    await send(node, queue_name, work.bodies)
    await consumed_all(work)
    await eventually(lambda: work.handled[b"m0"] == 2, timeout=30, what="m0 redelivered")
    await queue_settles(node, queue_name, timeout=30)
    assert_survived(run, work, prefetch=2)
    assert "PRECONDITION_FAILED - delivery acknowledgement on channel" in logs.text()
    record(figures, logs, "broker consumer_timeout (2 s) hit by a slow handler", work, broke=broke)


@pytest_twisted.ensureDeferred
async def test_handler_timeout_comes_before_the_brokers(
    rabbit_factory: Callable[..., RabbitNode], queue_name: str, services: Services, logs: Logs
) -> None:
    """With --handler-timeout below consumer_timeout, the slow handler is cancelled and the channel never closes."""
    node = await deferToThread(rabbit_factory, "consumer_timeout = 3000", advanced=TICK)
    work = Workload(2)

    def slow_first_time(message: Message) -> Deferred[None]:
        work.record(message)
        first_attempt = "consumer-svc-retries" not in message.headers  # a retry is a new copy
        return sleep(10 if message.body == b"m0" and first_attempt else 0)

    run = services(
        settings_for(node.url(), queue_name, prefetch=2, handler_timeout=1.0), slow_first_time
    )
    await run.consuming()
    await send(node, queue_name, work.bodies)
    await eventually(lambda: work.handled[b"m0"] == 2, timeout=30, what="m0 retried")
    await queue_settles(node, queue_name, timeout=30)
    assert_survived(run, work, prefetch=2, losses=0, retries=1)
    assert "HandlerTimeout: cancelled after 1s (--handler-timeout)" in logs.text()
    assert not [line for line in logs.lines() if any(m in line for m in LOSS)]


@pytest_twisted.ensureDeferred
async def test_a_memory_alarm_does_not_stop_consumption(
    fresh_rabbit: RabbitNode, queue_name: str, services: Services
) -> None:
    """While the broker's memory alarm blocks publishers, the consumer goes on consuming and acking."""
    work, gate = Workload(100), Deferred[None]()

    def gated(message: Message) -> Deferred[None]:
        work.record(message)
        return gate if len(work.handled) == 1 else sleep(0)

    run = services(settings_for(fresh_rabbit.url(), queue_name), gated)
    await run.consuming()
    await send(fresh_rabbit, queue_name, work.bodies)
    await eventually(lambda: len(work.handled) >= 1, timeout=10, what="the first message")
    await deferToThread(fresh_rabbit.set_memory_alarm, True)
    try:
        gate.callback(None)
        await consumed_all(work)
        await queue_settles(fresh_rabbit, queue_name)
        assert_survived(run, work, prefetch=10, losses=0)
    finally:
        await deferToThread(fresh_rabbit.set_memory_alarm, False)


@pytest_twisted.ensureDeferred
async def test_broker_down_at_start(
    rabbit_factory: Callable[..., RabbitNode],
    queue_name: str,
    services: Services,
    logs: Logs,
    figures: Figures,
) -> None:
    """The broker is down when the service starts and for a while: it retries, logging each wait, then consumes."""
    node = rabbit_factory(start=False)
    work = Workload(20)
    run = services(settings_for(node.url(), queue_name, reconnect_max=2.0), slow_recorder(work, 0))
    await eventually(
        lambda: logs.text().count("Reconnecting in") >= 3,
        timeout=20,
        what="three scheduled retries",
    )
    assert "connection refused" in logs.text()
    assert run.exits == []
    await deferToThread(node.start)
    up = now()
    await run.consuming(timeout=30)
    await send(node, queue_name, work.bodies)
    await consumed_all(work)
    assert_survived(run, work, prefetch=10, losses=0)
    resumed = event_time(logs, 0.0, "Consuming queue")  # maybe before start() returned
    assert resumed is not None
    figures.add(
        "broker down at start",
        work,
        detected=None,
        resumed=max(0.0, resumed - up),
    )


def test_sigterm_while_the_broker_is_down(
    rabbit_factory: Callable[..., RabbitNode], queue_name: str, twistd: Any
) -> None:
    """SIGTERM with the broker unreachable: twistd exits within its deadline, and its messages come back."""
    from support.amqp_tools import publish

    node = rabbit_factory()
    publish(node.url(), queue_name, [f"job{i}".encode() for i in range(6)])
    run = twistd(
        [
            "--url",
            node.url(),
            "--queue",
            queue_name,
            "--handler",
            "support.handlers:slow",
            "--prefetch",
            "3",
            "--shutdown-timeout",
            "3",
            "--reconnect-initial",
            "0.5",
        ],
        env={"HANDLER_SECONDS": "30"},
    )
    poll_until(lambda: len(run.records("start")) == 3, 30, message="3 handlers running")
    node.stop_app()
    run.wait_for_log("Lost the connection", timeout=20)
    started = time.monotonic()
    run.process.send_signal(signal.SIGTERM)
    run.wait(30)
    assert time.monotonic() - started < 3 + 5 + 2  # the deadline, the close timeout, slack
    node.start_app()
    poll_until(
        lambda: (
            node.list_queues().get(queue_name) is not None
            and node.list_queues()[queue_name].messages_ready == 6
        ),
        30,
        message="all 6 messages back",
    )


# -- the network, through a proxy that breaks on purpose


@pytest.fixture
def proxy(rabbit: RabbitNode) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy("127.0.0.1", rabbit.amqp_port)
    fault_proxy.start()
    yield fault_proxy
    pytest_twisted.blockon(within(15, fault_proxy.stop()))


async def network_drop(
    rabbit: RabbitNode,
    queue_name: str,
    services: Services,
    logs: Logs,
    proxy: FaultProxy,
    seconds: float,
) -> tuple[Running, Workload, float, float, float]:
    """Consume through the proxy, blackhole it for ``seconds``, heal it; return the timings."""
    work, prefetch = Workload(200), 10
    settings = settings_for(
        proxy_url(proxy), queue_name, prefetch=prefetch, heartbeat=2, connect_timeout=3
    )
    run = services(settings, slow_recorder(work, 0.02))
    await run.consuming()
    await send(rabbit, queue_name, work.bodies)
    await eventually(lambda: len(work.handled) >= 30, timeout=20, what="30 handled first")
    broke = now()
    proxy.blackhole(stall=True)  # TCP holds what it cannot deliver yet
    await sleep(seconds)  # the outage itself lasts this long; nothing is synchronised by it
    healed = now()
    proxy.pass_traffic()
    await eventually(
        lambda: event_time(logs, broke, *LOSS), timeout=30, what="the dead link noticed"
    )
    await run.consuming(timeout=30)
    await consumed_all(work)
    await queue_settles(rabbit, queue_name, timeout=30)
    detected = event_time(logs, broke, *LOSS)
    resumed = event_time(logs, max(healed, detected or healed), "Consuming queue")
    assert detected is not None
    assert resumed is not None
    return run, work, detected - broke, resumed - healed, healed - broke


@pytest_twisted.ensureDeferred
async def test_a_blackhole_past_the_heartbeat_timeout(
    rabbit: RabbitNode,
    queue_name: str,
    services: Services,
    logs: Logs,
    proxy: FaultProxy,
    figures: Figures,
) -> None:
    """Seed "Test Network Drop": a silent network is noticed by heartbeats within 2 x (heartbeat + 5) s, the
    teardown does not hang, handshakes into the void time out by themselves, and consumption resumes after."""
    # 20 s: the loss is noticed at about 14 s, and a reconnect into the void times out 3 s later.
    run, work, detected, resumed, _ = await network_drop(
        rabbit, queue_name, services, logs, proxy, seconds=20
    )
    assert detected <= 2 * (2 + 5) + 1
    assert "heartbeat timeout" in logs.text()
    assert "AMQP handshake timed out" in logs.text()
    assert_survived(run, work, prefetch=10)
    figures.add(
        "network blackhole 20 s (heartbeat 2 s, handshake timeout 3 s)",
        work,
        detected=detected,
        resumed=resumed,
    )


@pytest.mark.parametrize("seconds", [10, 60])
@pytest_twisted.ensureDeferred
async def test_a_network_drop(
    rabbit: RabbitNode,
    queue_name: str,
    services: Services,
    logs: Logs,
    proxy: FaultProxy,
    figures: Figures,
    seconds: int,
) -> None:
    """A short (10 s) and a long (60 s) outage: survived unattended, nothing lost."""
    run, work, detected, resumed, _ = await network_drop(
        rabbit, queue_name, services, logs, proxy, seconds=seconds
    )
    assert_survived(run, work, prefetch=10)
    figures.add(
        f"network drop {seconds} s (heartbeat 2 s)",
        work,
        detected=detected,
        resumed=resumed,
    )


@pytest_twisted.ensureDeferred
async def test_tcp_reset(
    rabbit: RabbitNode,
    queue_name: str,
    services: Services,
    logs: Logs,
    proxy: FaultProxy,
    figures: Figures,
) -> None:
    """Every connection reset mid-stream: noticed at once, consuming again in a moment."""
    work, prefetch = Workload(200), 10
    run = services(
        settings_for(proxy_url(proxy), queue_name, prefetch=prefetch), slow_recorder(work, 0.01)
    )
    await run.consuming()
    await send(rabbit, queue_name, work.bodies)
    await eventually(lambda: len(work.handled) >= 30, timeout=20, what="30 handled first")
    broke = now()
    assert proxy.reset_all() >= 1
    await eventually(lambda: event_time(logs, broke, *LOSS), timeout=10, what="the reset noticed")
    await consumed_all(work)
    await queue_settles(rabbit, queue_name)
    assert_survived(run, work, prefetch)
    detected = event_time(logs, broke, *LOSS)
    assert detected is not None
    resumed = event_time(logs, detected, "Consuming queue")
    assert resumed is not None
    figures.add(
        "TCP connection reset",
        work,
        detected=detected - broke,
        resumed=resumed - detected,
    )


# -- a chaos run: random faults while thousands of messages are consumed


# Bounded by its own deadlines (90 s of faults, then 120 s to finish): above the global net.
@pytest.mark.timeout(420)
@pytest_twisted.ensureDeferred
async def test_chaos(
    rabbit_factory: Callable[..., RabbitNode],
    queue_name: str,
    services: Services,
    logs: Logs,
    figures: Figures,
) -> None:
    """Random faults, one after another, while 3000 confirmed messages are consumed: none is lost.

    The seed is printed; replay a run with CHAOS_SEED=<seed>.
    """
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(2**32))
    print(f"chaos seed {seed} (replay: CHAOS_SEED={seed})")
    rng = random.Random(seed)
    node = await deferToThread(rabbit_factory)
    proxy = FaultProxy("127.0.0.1", node.amqp_port)
    proxy.start()
    try:
        work, prefetch = Workload(3000), 5
        settings = settings_for(
            proxy_url(proxy),
            queue_name,
            prefetch=prefetch,
            heartbeat=2,
            connect_timeout=3,
            reconnect_max=2.0,
        )
        await send(node, queue_name, work.bodies)
        run = services(settings, slow_recorder(work, 0.08))
        await run.consuming()

        async def restart_app() -> None:
            await deferToThread(node.restart_app)

        async def kill_and_start() -> None:
            await deferToThread(node.kill)
            await deferToThread(node.start)

        async def force_close() -> None:
            await deferToThread(node.close_all_connections, "chaos")

        async def reset() -> None:
            proxy.reset_all()

        async def blackhole() -> None:
            proxy.blackhole(stall=True)  # TCP holds what it cannot deliver yet
            await sleep(rng.uniform(3, 8))
            proxy.pass_traffic()

        async def channel_error() -> None:
            channel = run.service.consumer.channel
            if channel is not None and channel.is_open:
                channel.ack(10**9)

        async def memory_alarm() -> None:
            await deferToThread(node.set_memory_alarm, True)
            await sleep(rng.uniform(1, 3))
            await deferToThread(node.set_memory_alarm, False)

        faults = [
            restart_app,
            kill_and_start,
            force_close,
            reset,
            blackhole,
            channel_error,
            memory_alarm,
        ]
        injected: list[str] = []
        deadline = now() + 90
        while not work.done() and now() < deadline:
            fault = rng.choice(faults)
            injected.append(fault.__name__)
            await fault()
            await run.consuming(timeout=60)
            await sleep(rng.uniform(0.5, 3))
        await consumed_all(work, timeout=120)
        await queue_settles(node, queue_name, timeout=60)
        losses = sum(1 for line in run.logs.lines() if any(m in line for m in LOSS))
        print(
            f"chaos seed {seed}: {len(injected)} faults {injected}; {losses} losses; {work.duplicates} duplicates; {work.lost} lost"
        )
        assert work.lost == 0
        assert run.exits == []
        if "kill_and_start" not in injected:  # see assert_survived on broker crashes
            assert work.duplicates <= prefetch * max(losses, 1)
        figures.add(
            f"chaos: {len(injected)} random faults over 3000 messages (seed {seed})",
            work,
            detected=None,
            resumed=None,
        )
    finally:
        await within(15, proxy.stop())
