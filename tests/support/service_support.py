"""Running a `ConsumerService` in the test reactor: handlers that record, captured logs, waits.

Loaded as a pytest plugin by conftest.py, before pytest-twisted installs the reactor
chosen with --reactor: so neither the reactor nor consumer_svc._service (which imports
pika's Twisted adapter, which imports the reactor) is imported at module level.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from consumer_svc import ExitStatus, Message
from consumer_svc._settings import Settings
from consumer_svc._url import parse_url
from consumer_svc.testing.rabbitmq import RabbitNode

from .amqp_tools import publish
from .logs import Logs, captured
from .waiting import eventually, within

if TYPE_CHECKING:
    from consumer_svc._service import ConsumerService


class Recorder:
    """A handler that records what it handled, and behaves as the test asks."""

    def __init__(self, behaviour: Callable[[Message], Any] = lambda m: None) -> None:
        self.behaviour = behaviour
        self.bodies: list[bytes] = []
        self.redelivered: list[bool] = []

    def __call__(self, message: Message) -> Any:
        self.bodies.append(message.body)
        self.redelivered.append(message.redelivered)
        return self.behaviour(message)

    def count(self) -> Counter[bytes]:
        return Counter(self.bodies)


@pytest.fixture
def logs() -> Iterator[Logs]:
    """Every log event of the test."""
    with captured() as events:
        yield events


def settings_for(url: str, queue: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "url": parse_url(url),
        "queue": queue,
        "heartbeat": 5,
        "reconnect_initial": 0.2,
        "reconnect_max": 1.0,
        "retry_delay": 0.2,
        "shutdown_timeout": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


class Running:
    """A started service, its recorded exits, and a bounded stop."""

    def __init__(self, settings: Settings, handler: Callable[[Message], Any]) -> None:
        self.exits: list[ExitStatus] = []
        self.logs = Logs()
        globalLogPublisher.addObserver(self.logs)
        from consumer_svc._service import ConsumerService

        self.service: ConsumerService = ConsumerService(settings, handler, exit=self.exits.append)
        self.service.startService()

    async def consuming(self, timeout: float = 20) -> None:
        from consumer_svc._states import State

        await eventually(
            lambda: self.service.state is State.CONSUMING,
            timeout=timeout,
            what="the service to consume",
        )

    async def stop(self) -> None:
        if self.service.running:
            await within(60, self.service.stopService())
        globalLogPublisher.removeObserver(self.logs)


@pytest.fixture
def services() -> Iterator[Callable[[Settings, Callable[[Message], Any]], Running]]:
    """Starts services on demand and stops every one of them at the end."""
    started: list[Running] = []

    def start(settings: Settings, handler: Callable[[Message], Any]) -> Running:
        run = Running(settings, handler)
        started.append(run)
        return run

    yield start
    for run in started:
        pytest_twisted.blockon(Deferred.fromCoroutine(run.stop()))


def ready_and_unacked(node: RabbitNode, queue: str) -> tuple[int, int]:
    stats = node.list_queues().get(queue)
    return (stats.messages_ready, stats.messages_unacknowledged) if stats else (-1, -1)


async def queue_settles(node: RabbitNode, queue: str, ready: int = 0, timeout: float = 20) -> None:
    """Wait until the queue holds ``ready`` messages and none unacked."""
    await eventually(
        lambda: ready_and_unacked(node, queue) == (ready, 0),
        timeout=timeout,
        what=f"queue {queue} to hold {ready} ready and 0 unacked",
        blocking=True,
    )


async def send(node: RabbitNode, queue: str, bodies: list[bytes], **kwargs: Any) -> None:
    await deferToThread(publish, node.url(), queue, bodies, **kwargs)


def sleep(seconds: float) -> Deferred[None]:
    from twisted.internet import reactor

    return task.deferLater(reactor, seconds, lambda: None)


# -- reliability figures: what each fault test measured, printed at the end of the run

LOSS_MARKERS = (
    "Lost the connection",
    "Lost the consumer",
    "Could not connect",
    "Setting up the consumer failed",
)


def event_time(logs: Logs, since: float, *markers: str) -> float | None:
    """The log time of the first event after ``since`` whose text has one of ``markers``."""
    for event in logs.events:
        if event["log_time"] >= since and any(m in formatEvent(event) for m in markers):
            return float(event["log_time"])
    return None


class Figures:
    """Rows of the README's reliability table, as measured by the fault tests of this run."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, int, int]] = []

    def add(
        self, fault: str, work: Workload, *, detected: float | None, resumed: float | None
    ) -> None:
        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} s"

        self.rows.append((fault, seconds(detected), seconds(resumed), work.duplicates, work.lost))

    def table(self) -> str:
        lines = [
            "| fault | detected after | consuming again after the fault cleared | duplicates | lost |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {f} | {d} | {r} | {dup} | {lost} |" for f, d, r, dup, lost in self.rows]
        return "\n".join(lines)


FIGURES = Figures()


@pytest.fixture(scope="session")
def figures() -> Figures:
    return FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES.rows:
        terminalreporter.section("reliability figures (this run)")
        terminalreporter.write_line(FIGURES.table())


class Workload:
    """Messages published with confirms, and an account of how often each was handled."""

    def __init__(self, count: int, prefix: str = "m") -> None:
        self.bodies = [f"{prefix}{i}".encode() for i in range(count)]
        self.handled: Counter[bytes] = Counter()

    def record(self, message: Message) -> None:
        self.handled[message.body] += 1

    def done(self) -> bool:
        return len(self.handled) == len(self.bodies)

    @property
    def duplicates(self) -> int:
        return sum(self.handled.values()) - len(self.handled)

    @property
    def lost(self) -> int:
        return len(set(self.bodies) - set(self.handled))
