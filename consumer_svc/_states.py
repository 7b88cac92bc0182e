"""Where the service and its consumer are, as one transition table: state x event -> state, actions.

Everything that changes where the service is (a connection attempt, the
consumer's set-up, a lost subscription, a pause or a probe, a fatal error, the
stop) is an `Event` given to `Machine.fire`, with the `Facts` it came with.
The row for the current state and the event names the next state and the
actions to carry out; an event without a row is ignored, so no caller guards
against a state. Whoever watches (log lines, systemd, metrics, readiness)
subscribes an `Observer` and sees each `Transition`; the service and the
consumer each `perform` the actions that are theirs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from ._causes import Cause
    from ._errors import FatalError


class State(enum.Enum):
    """Where the service is (README.md "States")."""

    STOPPED = "stopped"
    CONNECTING = "connecting"
    SETTING_UP = "setting up"  # connected: channels opening, declaring, subscribing
    CONSUMING = "consuming"
    PAUSED = "paused"  # connected, taking no messages: a downstream is down, or the operator
    PROBING = "probing"  # paused, trying one message to see whether the downstream is back
    WAITING = "waiting to reconnect"
    STOPPING = "stopping"  # taking no messages, finishing those in flight, then closing
    FAILED = "failed"  # retrying cannot fix it: the process exits with a status


class Event(enum.Enum):
    """What can happen; the comment says who tells."""

    CONNECT = "connect"  # the factory: a connection attempt starts
    CONNECTED = "connected"  # the factory: the AMQP handshake finished
    SET_UP = "set up"  # the consumer: subscribed
    SET_UP_PAUSED = "set up, paused"  # the consumer: set up, but a pause goes on
    SETUP_FAILED = "setup failed"  # the consumer: a reconnect may fix it
    SUBSCRIPTION_LOST = "subscription lost"  # the consumer: its channel or subscription went
    LOST = "lost"  # the factory: the connection (or the attempt) ended
    RETRY = "retry"  # the factory: the next attempt is scheduled
    PAUSE = "pause"  # the consumer (failures in a row, `Pause`) or the operator (SIGTSTP)
    PROBE = "probe"  # the consumer: the pause's backoff is over, try one message
    PROBE_FAILED = "probe failed"  # the consumer: the message tried failed too
    RESUME = "resume"  # the consumer (a message succeeded) or the operator (SIGCONT)
    FAIL = "fail"  # anyone: retrying cannot fix this
    STOP = "stop"  # stopService
    HURRY = "hurry"  # a second SIGTERM or SIGINT while stopping
    STOP_DONE = "stop done"  # drained and closed, or the stop's deadline passed


class Action(enum.Enum):
    """What a row does besides moving the state; the service or the consumer performs it."""

    ATTACH = "attach"  # consumer: open the channels, declare, subscribe
    CLOSE = "close"  # service: close the connection, to start afresh
    SUCCEEDED = "succeeded"  # service: the reconnect backoff starts afresh next time
    HOLD = "hold"  # consumer: unsubscribe, hand back waiting messages, schedule a probe
    TRY_ONE = "try one"  # consumer: subscribe with a prefetch of 1
    SUBSCRIBE = "subscribe"  # consumer: subscribe with the full prefetch again
    GIVE_UP = "give up"  # service: stop reconnecting, close, exit with the error's status
    BEGIN_STOP = "begin stop"  # service: stop reconnecting, drain, close, within one deadline
    HURRY_STOP = "hurry stop"  # service: hand back what is in flight now, shorten the close
    FINISH_STOP = "finish stop"  # service: fire the Deferred stopService returned


@dataclass(frozen=True)
class Facts:
    """What came with an event; each event fills in the fields it has."""

    #: The connection the event is about (CONNECTED, SETUP_FAILED, LOST).
    connection: Any = None
    #: LOST: it was the service's current connection, not an older one.
    current: bool = False
    #: LOST: the AMQP handshake had finished (lost, rather than could not connect).
    opened: bool = False
    cause: Cause | None = None
    #: In words: why set-up failed, the subscription was lost, a pause began or ended.
    reason: str = ""
    failure: Failure | None = None
    error: FatalError | None = None
    #: RETRY: the delay before the next attempt; PAUSE, PROBE_FAILED: before the next probe.
    delay: float = 0.0
    attempt: int = 0
    #: PAUSE, RESUME: the operator's doing (a signal).
    by_operator: bool = False
    #: PAUSE: the consumer was paused already (the operator takes over the pause).
    again: bool = False
    #: STOP: the messages in flight and how long they get; HURRY: what hurried it.
    inflight: int = 0
    timeout: float = 0.0
    why: str = ""


@dataclass(frozen=True)
class Transition:
    """One row taken: from ``before`` on ``event`` to ``after``, with the event's facts."""

    before: State
    event: Event
    after: State
    facts: Facts = field(default_factory=Facts)


@dataclass(frozen=True)
class Row:
    """The next state, and the actions to carry out in order."""

    after: State
    actions: tuple[Action, ...] = ()


class Observer(Protocol):
    """Sees each transition taken: after the state changed, before the row's actions run."""

    def __call__(self, transition: Transition, /) -> None: ...


S, E, A = State, Event, Action
#: Connected with a subscription that can be live.
CONNECTED = frozenset({S.CONSUMING, S.PAUSED, S.PROBING})
#: Where a delivery is handed to the handler (a delivery can beat the end of set-up).
TAKING = frozenset({S.SETTING_UP, S.CONSUMING, S.PROBING})
#: Where something can be lost and is recovered.
ACTIVE = frozenset({S.CONNECTING, S.SETTING_UP, *CONNECTED, S.WAITING})
#: Where nothing is recovered any more.
ENDING = frozenset({S.STOPPING, S.STOPPED, S.FAILED})


def _rows(states: Iterable[State], event: Event, row: Row | None = None) -> dict[Any, Row]:
    """``event`` in each of ``states``: to ``row``, or (without one) staying put, observed."""
    return {(state, event): row or Row(state) for state in states}


#: Every transition there is; an event in a state without a row is ignored.
TABLE: Mapping[tuple[State, Event], Row] = {
    (S.STOPPED, E.CONNECT): Row(S.CONNECTING),
    (S.WAITING, E.CONNECT): Row(S.CONNECTING),
    (S.CONNECTING, E.CONNECTED): Row(S.SETTING_UP, (A.ATTACH,)),
    # Connected too late: the stop began, or retrying cannot help.
    **{(s, E.CONNECTED): Row(s, (A.CLOSE,)) for s in ENDING},
    (S.SETTING_UP, E.SET_UP): Row(S.CONSUMING, (A.SUCCEEDED,)),
    (S.SETTING_UP, E.SET_UP_PAUSED): Row(S.PAUSED, (A.SUCCEEDED, A.HOLD)),
    (S.SETTING_UP, E.SETUP_FAILED): Row(S.SETTING_UP, (A.CLOSE,)),
    **_rows(CONNECTED, E.SUBSCRIPTION_LOST, Row(S.WAITING, (A.CLOSE,))),
    **_rows(ACTIVE, E.LOST, Row(S.WAITING)),
    **_rows(ENDING, E.LOST),
    (S.WAITING, E.RETRY): Row(S.WAITING),
    **_rows(CONNECTED, E.PAUSE, Row(S.PAUSED, (A.HOLD,))),
    # Paused while not connected: remembered by the consumer, set up paused later.
    **_rows({S.STOPPED, S.CONNECTING, S.SETTING_UP, S.WAITING, *ENDING}, E.PAUSE),
    (S.PAUSED, E.PROBE): Row(S.PROBING, (A.TRY_ONE,)),
    (S.PROBING, E.PROBE_FAILED): Row(S.PAUSED, (A.HOLD,)),
    (S.PAUSED, E.RESUME): Row(S.CONSUMING, (A.SUBSCRIBE,)),
    (S.PROBING, E.RESUME): Row(S.CONSUMING, (A.SUBSCRIBE,)),
    **_rows({S.STOPPED, S.CONNECTING, S.SETTING_UP, S.WAITING, *ENDING}, E.RESUME),
    **_rows({S.STOPPED, *ACTIVE}, E.FAIL, Row(S.FAILED, (A.GIVE_UP,))),
    # While stopping: the stop goes on, and the process ends with the error's status.
    (S.STOPPING, E.FAIL): Row(S.STOPPING, (A.GIVE_UP,)),
    **_rows({S.STOPPED, *ACTIVE, S.FAILED}, E.STOP, Row(S.STOPPING, (A.BEGIN_STOP,))),
    (S.STOPPING, E.HURRY): Row(S.STOPPING, (A.HURRY_STOP,)),
    (S.STOPPING, E.STOP_DONE): Row(S.STOPPED, (A.FINISH_STOP,)),
}
del S, E, A


class Machine:
    """The current state, moved only by `fire` through the table; who watches; who acts."""

    def __init__(
        self, state: State = State.STOPPED, table: Mapping[tuple[State, Event], Row] = TABLE
    ) -> None:
        self.state = state
        self._table = table
        self._observers: list[Observer] = []
        self._performers: dict[Action, Callable[[Transition], object]] = {}

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Have ``observer`` see every transition from now on; returns the unsubscribe."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    def perform(self, action: Action, performer: Callable[[Transition], object]) -> None:
        """Have ``performer`` carry out ``action`` whenever a row names it."""
        self._performers[action] = performer

    def performers(self) -> frozenset[Action]:
        """The actions someone carries out (an action nobody performs is skipped)."""
        return frozenset(self._performers)

    def fire(self, event: Event, facts: Facts | None = None) -> Transition | None:
        """Take the row for the current state and ``event``: None, and nothing done, without one.

        An action may fire the next event itself: the state has moved already.
        """
        row = self._table.get((self.state, event))
        if row is None:
            return None
        transition = Transition(self.state, event, row.after, facts or Facts())
        self.state = row.after
        for observer in tuple(self._observers):
            observer(transition)
        for action in row.actions:
            performer = self._performers.get(action)
            if performer is not None:
                performer(transition)
        return transition
