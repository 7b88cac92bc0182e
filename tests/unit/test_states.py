"""The one transition table of the service and its consumer, row by row and as stories.

Each row runs on the real ConsumerService and Consumer over a MemoryReactorClock, fakes and no
broker; each test ends with no timer left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.logs import Logs
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from consumer_svc import ExitStatus
from consumer_svc._causes import Cause, Lost
from consumer_svc._channel import Channel
from consumer_svc._errors import FatalError, SetupFailed
from consumer_svc._service import CLOSE_TIMEOUT, ConsumerService
from consumer_svc._settings import Settings
from consumer_svc._states import (
    ENDING,
    TABLE,
    Action,
    Event,
    Facts,
    Machine,
    Row,
    State,
    Transition,
)
from consumer_svc._url import parse_url
from consumer_svc.testing import FakeChannel, FakeConnection
from consumer_svc.testing._fakes import FakeNotifier

S, E = State, Event
_EVERYWHERE_BUT = lambda *states: [s for s in State if s not in states]  # noqa: E731

#: Every row, written out again from README.md "States": state, event -> next state.
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
    (S.CONSUMING, E.SUBSCRIPTION_LOST): S.WAITING,
    (S.PAUSED, E.SUBSCRIPTION_LOST): S.WAITING,
    (S.PROBING, E.SUBSCRIPTION_LOST): S.WAITING,
    **{(s, E.LOST): S.WAITING for s in _EVERYWHERE_BUT(S.STOPPING, S.STOPPED, S.FAILED)},
    (S.STOPPING, E.LOST): S.STOPPING,
    (S.STOPPED, E.LOST): S.STOPPED,
    (S.FAILED, E.LOST): S.FAILED,
    (S.WAITING, E.RETRY): S.WAITING,
    (S.CONSUMING, E.PAUSE): S.PAUSED,
    (S.PAUSED, E.PAUSE): S.PAUSED,
    (S.PROBING, E.PAUSE): S.PAUSED,
    **{(s, E.PAUSE): s for s in _EVERYWHERE_BUT(S.CONSUMING, S.PAUSED, S.PROBING)},
    (S.PAUSED, E.PROBE): S.PROBING,
    (S.PROBING, E.PROBE_FAILED): S.PAUSED,
    (S.PAUSED, E.RESUME): S.CONSUMING,
    (S.PROBING, E.RESUME): S.CONSUMING,
    **{(s, E.RESUME): s for s in _EVERYWHERE_BUT(S.CONSUMING, S.PAUSED, S.PROBING)},
    **{(s, E.FAIL): S.FAILED for s in _EVERYWHERE_BUT(S.STOPPING, S.FAILED)},
    (S.STOPPING, E.FAIL): S.STOPPING,
    **{(s, E.STOP): S.STOPPING for s in _EVERYWHERE_BUT(S.STOPPING)},
    (S.STOPPING, E.HURRY): S.STOPPING,
    (S.STOPPING, E.STOP_DONE): S.STOPPED,
}


class Connection(FakeConnection):
    """A fake AMQP connection as the service sees it: opened, and closed when asked."""

    def __init__(self, clock: Any) -> None:
        self.consuming = FakeChannel(clock, number=2)
        super().__init__(FakeChannel(clock), self.consuming)


class Stalled(Connection):
    """A connection whose channels never open: setting up on it stays under way."""

    def open_channel(self) -> Deferred[Channel]:
        return Deferred()


class Story:
    """A ConsumerService on a MemoryReactorClock with a fake notifier, its exits and its log."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.notifier = FakeNotifier()
        self.exits: list[ExitStatus] = []
        settings = Settings(url=parse_url("amqp://u:p@broker/"), queue="q", stall_check=0)
        #: What the handler does with each message (a test may change it).
        self.behaviour: Callable[[Any], object] = lambda message: None
        self.service = ConsumerService(
            settings,
            lambda message: self.behaviour(message),
            reactor=self.reactor,
            exit=self.exits.append,
            notifier=self.notifier,
        )
        self.logs = Logs()

    @property
    def lines(self) -> list[str]:
        """The service's log lines so far (not Twisted's own)."""
        return [
            formatEvent(event)
            for event in self.logs.events
            if str(event.get("log_namespace", "")).startswith("consumer_svc")
        ]

    def state(self) -> State:
        """The service's state now, read through a call (see support.state for why)."""
        return self.service.state

    def statuses(self) -> list[str]:
        return [str(fields["STATUS"]) for fields in self.notifier.sent if "STATUS" in fields]

    def metric(self, name: str) -> float:
        value = self.service.metrics.registry.get_sample_value(name)
        assert value is not None, name
        return value

    def connect(self) -> Connection:
        """Start the service and let its first connection become ready: it consumes."""
        self.service.startService()
        connection = Connection(self.reactor)
        self.service.amqp_ready(connection)
        return connection

    def lose(self, connection: Connection | None, kind: Lost = Lost.CONNECTION_LOST) -> None:
        if connection is not None:
            connection.lost = True
        self.service.amqp_lost(connection, Cause(kind, "gone"))

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
    globalLogPublisher.addObserver(s.logs)
    try:
        yield s
    finally:
        globalLogPublisher.removeObserver(s.logs)
        s.settle()
        assert s.reactor.getDelayedCalls() == []


# -- the table itself


def test_the_table_holds_exactly_the_rows_written_out_here() -> None:
    """The transition table and this module's own list of rows name the same transitions."""
    assert {key: row.after for key, row in TABLE.items()} == ROWS


def test_every_action_has_a_performer_in_the_service() -> None:
    """The service and its consumer between them carry out every action the table names."""
    named = {action for row in TABLE.values() for action in row.actions}
    assert named == set(Action)
    assert Story().service.machine.performers() == set(Action)


def test_an_event_without_a_row_is_ignored() -> None:
    """An event the current state has no row for changes nothing and reaches no observer."""
    seen: list[Transition] = []
    machine = Machine(State.WAITING)
    machine.subscribe(seen.append)
    assert machine.fire(Event.SET_UP) is None
    assert machine.state is State.WAITING
    assert seen == []


def test_observers_see_the_new_state_before_the_actions_run() -> None:
    """Observers see each transition once the state changed; the row's actions run after them."""
    order: list[str] = []
    machine = Machine(State.SETTING_UP)
    machine.perform(Action.SUCCEEDED, lambda t: order.append(f"action in {machine.state.value}"))
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
    """A machine follows whichever table it is given: the machinery is apart from the rows."""
    machine = Machine(table={(State.STOPPED, Event.STOP): Row(State.FAILED)})
    machine.fire(Event.STOP)
    assert machine.state is State.FAILED


# -- every row, on the service


def _facts(story: Story, event: Event) -> Facts:
    """What the service or the consumer would pass with ``event``."""
    clock = story.reactor
    if event is Event.CONNECTED:
        return Facts(connection=Stalled(clock))
    if event in (Event.SET_UP_PAUSED, Event.PAUSE, Event.PROBE, Event.RESUME):
        return Facts(reason="db down", delay=5.0)
    if event is Event.PROBE_FAILED:
        return Facts(reason="RuntimeError: still down", delay=10.0)
    if event is Event.SETUP_FAILED:
        return Facts(connection=Connection(clock), failure=Failure(SetupFailed("no queue")))
    if event is Event.SUBSCRIPTION_LOST:
        return Facts(reason="cancelled")
    if event is Event.LOST:
        return Facts(cause=Cause(Lost.CONNECTION_LOST, "gone"), opened=True)
    if event is Event.RETRY:
        return Facts(delay=1.5, attempt=2)
    if event is Event.FAIL:
        return Facts(error=FatalError("broken"))
    if event is Event.STOP:
        return Facts(inflight=0, timeout=30.0)
    if event is Event.HURRY:
        return Facts(why="SIGTERM")
    return Facts()


def _expected_status(before: State, event: Event, after: State, facts: Facts) -> list[str]:
    """The STATUS= lines a row sends, written from README.md rather than from the code."""
    if event is Event.FAIL:
        return ["Failed (exit status 1): broken"]
    if event is Event.PAUSE:
        return ["Paused: db down"] if after is State.PAUSED else []
    if event is Event.RESUME:
        return ["Consuming queue q"] if after is State.CONSUMING else []
    return {
        Event.CONNECT: ["Connecting to broker:5672"],
        Event.SET_UP: ["Consuming queue q"],
        Event.SET_UP_PAUSED: ["Paused: db down"],
        Event.RETRY: ["Reconnecting in 1.5s (attempt 2): "],
        Event.STOP: ["Draining 0 in-flight message(s)"],
        Event.STOP_DONE: ["Stopped"],
    }.get(event, [])


#: The rows in a stable order, for the test ids.
ROW_ORDER = sorted(ROWS, key=lambda row: (row[0].name, row[1].name))


@pytest.mark.parametrize(("before", "event"), ROW_ORDER)
def test_each_row(story: Story, before: State, event: Event) -> None:
    """Each row leads to its next state with the systemd status, readiness and actions it promises."""
    service = story.service
    if event in (Event.STOP_DONE, Event.HURRY):
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
    if after in (State.PAUSED, State.PROBING):
        assert words.startswith("paused: ")
    else:
        assert words == after.value
    if event is Event.FAIL:
        assert story.exits == [ExitStatus.FAILURE]
        assert service.exit_status is ExitStatus.FAILURE
        assert any(line.startswith("Giving up, retrying cannot fix this") for line in story.lines)
    else:
        assert story.exits == []
    if event in (Event.CONNECTED, Event.SETUP_FAILED):
        closes = [] if before is State.CONNECTING else [CLOSE_TIMEOUT]
        assert facts.connection.shutdowns == closes
    if event is Event.STOP_DONE:
        assert story.notifier.closed == 1
        assert service._stop_done is None
    if event is Event.LOST and before in ENDING:
        assert story.lines == ["Connection closed: " + str(facts.cause)]
    if event is Event.STOP:
        # The stop's one deadline is set; the drain (nothing in flight) has ended already.
        assert service._overdue is not None
        assert service._overdue.active()
        service._overdue.cancel()


# -- stories


def test_a_first_connection_consumes_and_tells_systemd_it_is_ready(story: Story) -> None:
    """Connecting, setting up and consuming send READY once, count the connection and make /readyz ready."""
    story.connect()
    assert story.state() is State.CONSUMING
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
    assert story.state() is State.WAITING
    assert story.metric("consumer_connected") == 0
    assert story.service.readiness() == (False, "waiting to reconnect")
    story.service.factory.retry()
    assert story.statuses()[-1].startswith("Reconnecting in ")
    assert story.statuses()[-1].endswith("(attempt 1): connection lost: gone")
    story.reactor.advance(story.service.factory.delay)
    assert story.state() is State.CONNECTING
    story.service.amqp_ready(Connection(story.reactor))
    assert story.state() is State.CONSUMING
    assert [f for f in story.notifier.sent if "READY" in f] == [
        {"READY": 1, "STATUS": "Consuming queue q"}
    ]
    assert story.metric("consumer_connections_total") == 2
    assert story.metric("consumer_reconnect_delay_seconds") == 0


def test_failures_in_a_row_pause_probe_and_resume_in_view_of_everyone(story: Story) -> None:
    """Paused by failing messages, the service is not ready, says why, probes after the delay, and is ready again after a success."""
    down = {"db": True}

    def handler(message: object) -> None:
        if down["db"]:
            raise RuntimeError("db down")

    story.behaviour = handler
    connection = story.connect()
    channel = connection.consuming
    for tag in range(1, story.service.settings.pause_after + 1):
        channel.deliver(tag)
    assert story.state() is State.PAUSED
    cause = "10 failures in a row, the last: RuntimeError: db down"
    assert story.service.readiness() == (False, f"paused: {cause}")
    assert story.statuses()[-1] == f"Paused: {cause}"
    assert story.metric("consumer_paused") == 1
    assert story.metric("consumer_pauses_total") == 1
    story.reactor.advance(story.service.settings.retry_delay)
    assert story.state() is State.PROBING
    assert channel.prefetches[-1] == 1
    down["db"] = False
    channel.deliver(99)
    assert story.state() is State.CONSUMING
    assert story.service.readiness() == (True, "consuming")
    assert story.statuses()[-1] == "Consuming queue q"
    assert story.metric("consumer_paused") == 0
    assert any(line.startswith("Resuming after a pause (10 failures") for line in story.lines)


def test_a_failed_probe_goes_back_to_paused(story: Story) -> None:
    """A probe whose message fails hands it back and waits twice as long, paused again."""
    story.connect()
    story.service.consumer.pause("db down", delay=5)
    story.reactor.advance(5)
    assert story.state() is State.PROBING
    story.service.consumer._probe_failed("RuntimeError: still down")
    assert story.state() is State.PAUSED
    assert any(
        line == "Still paused: the probe failed (RuntimeError: still down); trying again in 10s"
        for line in story.lines
    )


def test_the_operator_takes_over_a_pause_without_counting_another(story: Story) -> None:
    """SIGTSTP during an automatic pause makes it the operator's: no probe, one pause counted."""
    story.connect()
    story.service.consumer.pause("db down", delay=5)
    story.service.consumer.pause("paused by the operator (SIGTSTP)", by_operator=True)
    assert story.state() is State.PAUSED
    assert story.metric("consumer_pauses_total") == 1
    assert story.service.readiness() == (False, "paused: paused by the operator (SIGTSTP)")
    story.reactor.advance(5)
    assert story.state() is State.PAUSED  # no probe
    story.service._operator_resume()
    assert story.state() is State.CONSUMING


def test_a_pause_outlives_a_reconnect(story: Story) -> None:
    """Paused when the connection drops, the service is paused again once set up on the next one."""
    first = story.connect()
    story.service.consumer.pause("db down", delay=5)
    story.lose(first)
    assert story.state() is State.WAITING
    story.reactor.advance(5)  # the probe's time comes while disconnected: nothing to try
    assert story.state() is State.WAITING
    story.service.amqp_connecting()
    story.service.amqp_ready(Connection(story.reactor))
    assert story.state() is State.PAUSED
    assert story.service.readiness() == (False, "paused: db down")
    assert story.statuses()[-1] == "Paused: db down"
    story.reactor.advance(5)
    assert story.state() is State.PROBING


def test_a_lost_subscription_closes_the_connection_and_waits(story: Story) -> None:
    """A subscription lost while connected logs why and closes the connection to start afresh."""
    connection = story.connect()
    connection.consuming.die()
    assert story.state() is State.WAITING
    assert connection.shutdowns == [CLOSE_TIMEOUT]
    assert any(line.startswith("Lost the consumer of queue 'q'") for line in story.lines)


def test_a_setup_the_broker_refuses_for_good_gives_up(story: Story) -> None:
    """A 406 on the work queue while setting up is fatal: FAILED, and the process exits 78."""
    from pika.exceptions import ChannelClosedByBroker

    story.service.startService()
    connection = Connection(story.reactor)
    connection.consuming.refuse_declares = ChannelClosedByBroker(
        406, "PRECONDITION_FAILED - inequivalent arg 'x-max-length'"
    )
    story.service.amqp_ready(connection)
    assert story.state() is State.FAILED
    assert story.exits == [ExitStatus.TOPOLOGY_MISMATCH]
    assert connection.shutdowns == [CLOSE_TIMEOUT]


def test_a_refused_login_gives_up_with_its_exit_status(story: Story) -> None:
    """Access refused while connecting is fatal: STATUS says so and the process exits with its status."""
    story.service.startService()
    story.lose(None, Lost.ACCESS_REFUSED)
    assert story.state() is State.FAILED
    assert story.exits == [ExitStatus.ACCESS_REFUSED]
    assert story.statuses()[-1].startswith("Failed (exit status 77): ")
    assert not story.service.factory.continueTrying


def test_a_stop_while_consuming_drains_closes_and_ends_stopped(story: Story) -> None:
    """Stopping with nothing in flight closes the connection and ends STOPPED, telling systemd each step."""
    connection = story.connect()
    stopped = story.stop()
    assert stopped.called
    assert story.state() is State.STOPPED
    assert story.notifier.sent[-2:] == [
        {"STOPPING": 1, "STATUS": "Draining 0 in-flight message(s)"},
        {"STATUS": "Stopped"},
    ]
    assert story.notifier.closed == 1
    assert len(connection.shutdowns) == 1
    assert story.lines[-1] == "Stopped"


def test_a_stop_after_giving_up_still_drains_and_ends(story: Story) -> None:
    """A fatal error, then the stop it causes: the stop runs to its end and the exit status stays."""
    story.connect()
    story.service.consumer._fatal(FatalError("broken"))
    assert story.state() is State.FAILED
    stopped = story.stop()
    assert stopped.called
    assert story.state() is State.STOPPED
    assert story.service.exit_status is ExitStatus.FAILURE


def test_a_connection_ready_during_the_stop_is_closed_at_once(story: Story) -> None:
    """A connection that becomes ready after the stop began is closed, not set up."""
    story.service.startService()
    story.stop()
    late = Connection(story.reactor)
    story.service.amqp_ready(late)
    assert late.shutdowns == [CLOSE_TIMEOUT]
    assert story.state() is State.STOPPED


def test_hurry_outside_a_stop_does_nothing(story: Story) -> None:
    """A second signal before any stop began neither logs nor changes the state."""
    story.connect()
    story.service.hurry("SIGTERM")
    assert story.state() is State.CONSUMING
    assert not any("again while stopping" in line for line in story.lines)
