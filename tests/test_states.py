"""The service's one transition table, row by row and as stories, on a Clock with fakes and no broker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from consumer_svc import ExitStatus
from consumer_svc._amqp import Cause, Lost
from consumer_svc._consumer import SetupFailed
from consumer_svc._errors import FatalError
from consumer_svc._service import CLOSE_TIMEOUT, ConsumerService
from consumer_svc._settings import Settings, parse_url
from consumer_svc._states import TABLE, Event, Facts, Machine, Row, State, Transition
from consumer_svc.testing import FakeChannel, FakeConnection

S, E = State, Event

#: Every row, written out again: state, event, next state. The table must say the same.
ROWS: dict[tuple[State, Event], State] = {
    (S.STOPPED, E.CONNECT): S.CONNECTING,
    (S.WAITING, E.CONNECT): S.CONNECTING,
    (S.CONNECTING, E.CONNECTED): S.SETTING_UP,
    (S.STOPPING, E.CONNECTED): S.STOPPING,
    (S.STOPPED, E.CONNECTED): S.STOPPED,
    (S.FAILED, E.CONNECTED): S.FAILED,
    (S.SETTING_UP, E.SET_UP): S.CONSUMING,
    (S.SETTING_UP, E.SET_UP_PAUSED): S.PAUSED,
    (S.SETTING_UP, E.SETUP_FAILED): S.SETTING_UP,
    (S.SETTING_UP, E.SETUP_FATAL): S.FAILED,
    (S.CONSUMING, E.SUBSCRIPTION_LOST): S.WAITING,
    (S.PAUSED, E.SUBSCRIPTION_LOST): S.WAITING,
    (S.CONNECTING, E.LOST): S.WAITING,
    (S.SETTING_UP, E.LOST): S.WAITING,
    (S.CONSUMING, E.LOST): S.WAITING,
    (S.PAUSED, E.LOST): S.WAITING,
    (S.WAITING, E.LOST): S.WAITING,
    (S.STOPPING, E.LOST): S.STOPPING,
    (S.STOPPED, E.LOST): S.STOPPED,
    (S.FAILED, E.LOST): S.FAILED,
    (S.CONNECTING, E.LOST_FATAL): S.FAILED,
    (S.SETTING_UP, E.LOST_FATAL): S.FAILED,
    (S.CONSUMING, E.LOST_FATAL): S.FAILED,
    (S.PAUSED, E.LOST_FATAL): S.FAILED,
    (S.WAITING, E.LOST_FATAL): S.FAILED,
    (S.STOPPING, E.LOST_FATAL): S.STOPPING,
    (S.STOPPED, E.LOST_FATAL): S.STOPPED,
    (S.FAILED, E.LOST_FATAL): S.FAILED,
    (S.WAITING, E.RETRY): S.WAITING,
    (S.CONSUMING, E.PAUSE): S.PAUSED,
    (S.PAUSED, E.PAUSE): S.PAUSED,
    (S.STOPPED, E.PAUSE): S.STOPPED,
    (S.CONNECTING, E.PAUSE): S.CONNECTING,
    (S.SETTING_UP, E.PAUSE): S.SETTING_UP,
    (S.WAITING, E.PAUSE): S.WAITING,
    (S.STOPPING, E.PAUSE): S.STOPPING,
    (S.FAILED, E.PAUSE): S.FAILED,
    (S.PAUSED, E.RESUME): S.CONSUMING,
    (S.CONSUMING, E.RESUME): S.CONSUMING,
    (S.STOPPED, E.RESUME): S.STOPPED,
    (S.CONNECTING, E.RESUME): S.CONNECTING,
    (S.SETTING_UP, E.RESUME): S.SETTING_UP,
    (S.WAITING, E.RESUME): S.WAITING,
    (S.STOPPING, E.RESUME): S.STOPPING,
    (S.FAILED, E.RESUME): S.FAILED,
    (S.STOPPED, E.FAIL): S.FAILED,
    (S.CONNECTING, E.FAIL): S.FAILED,
    (S.SETTING_UP, E.FAIL): S.FAILED,
    (S.CONSUMING, E.FAIL): S.FAILED,
    (S.PAUSED, E.FAIL): S.FAILED,
    (S.WAITING, E.FAIL): S.FAILED,
    (S.STOPPING, E.FAIL): S.FAILED,
    (S.STOPPED, E.STOP): S.STOPPING,
    (S.CONNECTING, E.STOP): S.STOPPING,
    (S.SETTING_UP, E.STOP): S.STOPPING,
    (S.CONSUMING, E.STOP): S.STOPPING,
    (S.PAUSED, E.STOP): S.STOPPING,
    (S.WAITING, E.STOP): S.STOPPING,
    (S.FAILED, E.STOP): S.FAILED,
    (S.STOPPING, E.HURRY): S.STOPPING,
    (S.FAILED, E.HURRY): S.FAILED,
    (S.STOPPING, E.STOP_DONE): S.STOPPED,
    (S.FAILED, E.STOP_DONE): S.FAILED,
}
_ENDING = (S.STOPPING, S.STOPPED, S.FAILED)


class FakeNotifier:
    """Records what the service tells systemd."""

    watchdog_interval: float | None = None
    enabled = True

    def __init__(self) -> None:
        self.sent: list[dict[str, str | int]] = []
        self.closed = 0

    def notify(self, **fields: str | int) -> None:
        self.sent.append(fields)

    def close(self) -> None:
        self.closed += 1


class Connection(FakeConnection):
    """A fake AMQP connection as the service sees it: opened, and closed when asked."""

    def __init__(self, clock: Any) -> None:
        super().__init__(FakeChannel(clock), FakeChannel(clock, number=2))
        # FakeConnection.opened (the channels opened) stands in for AMQPConnection.opened.
        self.transport = None
        self.shutdowns: list[float] = []

    def shutdown(self, timeout: float) -> Deferred[None]:
        self.shutdowns.append(timeout)
        return succeed(None)


class Stalled(Connection):
    """A connection whose channels never open: setting up on it stays under way."""

    def open_channel(self) -> Deferred[FakeChannel]:
        return Deferred()


class Story:
    """A ConsumerService on a MemoryReactorClock with a fake notifier, its exits and its log."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.notifier = FakeNotifier()
        self.exits: list[ExitStatus] = []
        settings = Settings(url=parse_url("amqp://u:p@broker/"), queue="q", stall_check=0)
        self.service = ConsumerService(
            settings,
            lambda message: None,
            reactor=self.reactor,
            exit=self.exits.append,
            notifier=self.notifier,  # type: ignore[arg-type]
        )
        self.lines: list[str] = []

    def log(self, event: LogEvent) -> None:
        if str(event.get("log_namespace", "")).startswith("consumer_svc"):
            self.lines.append(formatEvent(event))

    def statuses(self) -> list[str | int]:
        return [fields["STATUS"] for fields in self.notifier.sent if "STATUS" in fields]

    def metric(self, name: str) -> float:
        value = self.service.metrics.registry.get_sample_value(name)
        assert value is not None, name
        return value

    def connect(self) -> Connection:
        """Start the service and let its first connection become ready: it consumes."""
        self.service.startService()
        connection = Connection(self.reactor)
        self.service.amqp_ready(connection)  # type: ignore[arg-type]
        return connection

    def lose(self, connection: Connection | None, kind: Lost = Lost.CONNECTION_LOST) -> None:
        if connection is not None:
            connection.lost = True
        self.service.amqp_lost(connection, Cause(kind, "gone"))  # type: ignore[arg-type]

    def stop(self) -> Deferred[None]:
        return self.service.stopService()

    def settle(self) -> None:
        """End whatever the story left running (reconnects, deadlines, probes)."""
        self.service.factory.stopTrying()
        if self.service.consumer.paused is not None:
            self.service.consumer.resume()
        self.service.consumer._stop_stall_check()
        self.reactor.advance(60)


@pytest.fixture
def story() -> Iterator[Story]:
    s = Story()
    globalLogPublisher.addObserver(s.log)
    try:
        yield s
    finally:
        globalLogPublisher.removeObserver(s.log)
        s.settle()
        assert s.reactor.getDelayedCalls() == []


# -- the table itself


def test_the_table_holds_exactly_the_rows_written_out_here() -> None:
    """The transition table and this module's own list of rows name the same transitions."""
    assert {key: row.after for key, row in TABLE.items()} == ROWS


def test_an_event_without_a_row_is_ignored() -> None:
    """An event the current state has no row for changes nothing and reaches no observer."""
    seen: list[Transition] = []
    machine = Machine(actions=None, state=State.WAITING)  # type: ignore[arg-type]
    machine.subscribe(seen.append)
    assert machine.fire(Event.SET_UP) is None
    assert machine.state is State.WAITING
    assert seen == []


def test_observers_see_the_new_state_before_the_actions_run() -> None:
    """Observers see each transition once the state changed, and the row's actions run after them."""
    order: list[str] = []

    class Actions:
        def succeeded(self, transition: Transition) -> None:
            order.append(f"action in {machine.state.value}")

    machine = Machine(Actions(), state=State.SETTING_UP)  # type: ignore[arg-type]
    machine.subscribe(lambda t: order.append(f"observer in {machine.state.value}"))
    unsubscribe = machine.subscribe(lambda t: order.append(f"{t.before.value} -> {t.after.value}"))
    transition = machine.fire(Event.SET_UP)
    assert transition == Transition(State.SETTING_UP, Event.SET_UP, State.CONSUMING, Facts())
    assert order == ["observer in consuming", "setting up -> consuming", "action in consuming"]
    unsubscribe()
    machine.state = State.SETTING_UP
    machine.fire(Event.SET_UP)
    assert order[3:] == ["observer in consuming", "action in consuming"]


def test_a_custom_table_drives_the_machine() -> None:
    """A machine follows whichever table it is given, which keeps the machinery apart from the rows."""
    machine = Machine(None, table={(State.STOPPED, Event.STOP): Row(State.FAILED)})  # type: ignore[arg-type]
    machine.fire(Event.STOP)
    assert machine.state is State.FAILED


# -- every row, on the service


def _facts(story: Story, event: Event) -> Facts:
    """What the service would pass with ``event``."""
    clock = story.reactor
    if event is Event.CONNECTED:
        return Facts(connection=Stalled(clock))
    if event is Event.SET_UP_PAUSED:
        return Facts(reason="db down")
    if event is Event.SETUP_FAILED:
        return Facts(connection=Connection(clock), failure=Failure(SetupFailed("no queue")))
    if event is Event.SETUP_FATAL:
        return Facts(connection=Connection(clock), error=FatalError("mismatch"))
    if event is Event.SUBSCRIPTION_LOST:
        return Facts(reason="cancelled")
    if event is Event.LOST:
        return Facts(cause=Cause(Lost.CONNECTION_LOST, "gone"), opened=True)
    if event is Event.LOST_FATAL:
        cause = Cause(Lost.ACCESS_REFUSED, "nope")
        return Facts(cause=cause, error=FatalError(str(cause)))
    if event is Event.RETRY:
        return Facts(delay=1.5, attempt=2)
    if event is Event.PAUSE:
        return Facts(reason="db down")
    if event is Event.FAIL:
        return Facts(error=FatalError("broken"))
    if event is Event.STOP:
        return Facts(inflight=0)
    if event is Event.HURRY:
        return Facts(why="SIGTERM")
    return Facts()


def _expected_status(before: State, event: Event, after: State, facts: Facts) -> list[str | int]:
    """The STATUS= lines a row sends, written from README.md rather than from the code."""
    if after is State.FAILED and before is not State.FAILED:
        assert facts.error is not None
        return [f"Failed (exit status {int(facts.error.status)}): {facts.error}"]
    return {
        Event.CONNECT: ["Connecting to broker:5672"],
        Event.SET_UP: ["Consuming queue q"],
        Event.SET_UP_PAUSED: ["Consuming queue q"],
        Event.RETRY: ["Reconnecting in 1.5s (attempt 2): "],
        Event.PAUSE: ["Paused: db down"],
        Event.RESUME: ["Consuming queue q"],
        Event.STOP: ["Draining 0 in-flight message(s)"],
        Event.STOP_DONE: ["Stopped"],
    }.get(event, [])


@pytest.mark.parametrize(("before", "event"), sorted(ROWS, key=lambda k: (k[0].name, k[1].name)))
def test_each_row(story: Story, before: State, event: Event) -> None:
    """Each row leads to its next state with the systemd status, readiness and actions it promises."""
    service = story.service
    if event is Event.STOP_DONE or event is Event.HURRY:
        service._stop_done = Deferred()
    service.machine.state = before
    facts = _facts(story, event)
    taken = service.machine.fire(event, facts)
    after = ROWS[before, event]
    assert taken == Transition(before, event, after, facts)
    assert service.state is after
    assert story.statuses() == _expected_status(before, event, after, facts)
    ready, words = service.readiness()
    assert ready is (after is State.CONSUMING)
    assert words == ("paused: db down" if after is State.PAUSED else after.value)
    if after is State.FAILED and before is not State.FAILED:
        assert story.exits == [ExitStatus.FAILURE]
        assert service.exit_status is ExitStatus.FAILURE
        assert any(line.startswith("Giving up, retrying cannot fix this") for line in story.lines)
    else:
        assert story.exits == []
    if event in (Event.CONNECTED, Event.SETUP_FAILED) and facts.connection is not None:
        closes = [] if before is State.CONNECTING else [CLOSE_TIMEOUT]
        assert facts.connection.shutdowns == closes
    if event is Event.STOP_DONE:
        assert story.notifier.closed == 1
        assert service._stop_done is None
    if event in (Event.LOST, Event.LOST_FATAL) and before in _ENDING:
        assert story.lines == ["Connection closed: " + str(facts.cause)]


# -- stories


def test_a_first_connection_consumes_and_tells_systemd_it_is_ready(story: Story) -> None:
    """Connecting, setting up and consuming send READY once, count the connection and make /readyz ready."""
    story.connect()
    assert story.service.state is State.CONSUMING
    assert story.notifier.sent == [
        {"STATUS": "Connecting to broker:5672"},
        {"READY": 1, "STATUS": "Consuming queue q"},
    ]
    assert story.service.readiness() == (True, "consuming")
    assert story.metric("consumer_connections_total") == 1
    assert story.metric("consumer_connected") == 1
    prefetch = story.service.settings.prefetch
    assert story.lines[-1] == f"Consuming queue 'q' (prefetch {prefetch})"


def test_a_lost_connection_waits_reconnects_and_is_ready_again_without_a_second_ready(
    story: Story,
) -> None:
    """A lost connection waits out the backoff, reconnects, and consumes again with STATUS but no second READY."""
    first = story.connect()
    story.lose(first)
    assert story.service.state is State.WAITING
    assert story.metric("consumer_connected") == 0
    assert story.service.readiness() == (False, "waiting to reconnect")
    story.service.factory.retry()
    assert story.statuses()[-1].startswith("Reconnecting in ")  # type: ignore[union-attr]
    assert str(story.statuses()[-1]).endswith("(attempt 1): connection lost: gone")
    story.reactor.advance(story.service.factory.delay)
    assert story.service.state is State.CONNECTING
    story.service.amqp_ready(Connection(story.reactor))  # type: ignore[arg-type]
    assert story.service.state is State.CONSUMING
    assert [f for f in story.notifier.sent if "READY" in f] == [
        {"READY": 1, "STATUS": "Consuming queue q"}
    ]
    assert story.metric("consumer_connections_total") == 2
    assert story.metric("consumer_reconnect_delay_seconds") == 0


def test_a_pause_is_a_state_everyone_sees_and_a_resume_ends_it(story: Story) -> None:
    """The consumer's pause makes the service paused for /readyz, systemd and metrics; resuming undoes it."""
    story.connect()
    story.service.consumer.pause("db down")
    assert story.service.state is State.PAUSED
    assert story.service.readiness() == (False, "paused: db down")
    assert story.statuses()[-1] == "Paused: db down"
    assert story.metric("consumer_paused") == 1
    assert story.metric("consumer_pauses_total") == 1
    story.service.consumer.resume()
    assert story.service.state is State.CONSUMING
    assert story.service.readiness() == (True, "consuming")
    assert story.statuses()[-1] == "Consuming queue q"
    assert story.metric("consumer_paused") == 0


def test_a_pause_outlives_a_reconnect(story: Story) -> None:
    """Paused when the connection drops, the service is paused again once set up on the next one."""
    first = story.connect()
    story.service.consumer.pause("db down")
    story.lose(first)
    assert story.service.state is State.WAITING
    story.service.amqp_connecting()
    story.service.amqp_ready(Connection(story.reactor))  # type: ignore[arg-type]
    assert story.service.state is State.PAUSED
    assert story.service.readiness() == (False, "paused: db down")


def test_a_lost_subscription_closes_the_connection_and_waits(story: Story) -> None:
    """A subscription lost while connected logs why and closes the connection to start afresh."""
    connection = story.connect()
    story.service.consumer.channel.die()  # type: ignore[union-attr]
    assert story.service.state is State.WAITING
    assert connection.shutdowns == [CLOSE_TIMEOUT]
    assert any(line.startswith("Lost the consumer of queue 'q'") for line in story.lines)


def test_a_refused_login_gives_up_with_its_exit_status(story: Story) -> None:
    """Access refused while connecting is fatal: STATUS says so and the process exits with its status."""
    story.service.startService()
    story.lose(None, Lost.ACCESS_REFUSED)
    assert story.service.state is State.FAILED
    assert story.exits == [ExitStatus.ACCESS_REFUSED]
    assert story.statuses()[-1] == "Failed (exit status 77): access refused: gone"
    assert not story.service.factory.continueTrying


def test_a_stop_while_consuming_drains_closes_and_ends_stopped(story: Story) -> None:
    """Stopping with nothing in flight closes the connection and ends STOPPED, telling systemd each step."""
    connection = story.connect()
    stopped = story.stop()
    assert stopped.called
    assert story.service.state is State.STOPPED
    assert story.notifier.sent[-2:] == [
        {"STOPPING": 1, "STATUS": "Draining 0 in-flight message(s)"},
        {"STATUS": "Stopped"},
    ]
    assert story.notifier.closed == 1
    assert len(connection.shutdowns) == 1
    assert story.lines[-1] == "Stopped"


def test_a_connection_ready_during_the_stop_is_closed_at_once(story: Story) -> None:
    """A connection that becomes ready after the stop began is closed, not set up."""
    story.service.startService()
    story.stop()
    late = Connection(story.reactor)
    story.service.amqp_ready(late)  # type: ignore[arg-type]
    assert late.shutdowns == [CLOSE_TIMEOUT]
    assert story.service.state is State.STOPPED


def test_hurry_outside_a_stop_does_nothing(story: Story) -> None:
    """A second signal before any stop began neither logs nor changes the state."""
    story.connect()
    story.service.hurry("SIGTERM")
    assert story.service.state is State.CONSUMING
    assert not any("again while stopping" in line for line in story.lines)
