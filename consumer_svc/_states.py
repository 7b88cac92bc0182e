"""The service's lifecycle as one transition table: state x event -> next state and actions.

Everything that changes where the service is (the connection, the consumer's
set-up, a pause, a fatal error, the stop) is an `Event` fed to `Machine.fire`.
An event with no row for the current state is ignored. Who watches (log lines,
systemd notify, metrics, readiness) subscribes an `Observer` and sees each
`Transition` as a frozen record; the actions attached to a row (attach the
consumer, close the connection, give up …) are carried out by an `Actions`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from ._amqp import Cause
    from ._errors import FatalError


class State(enum.Enum):
    """Where the service is; see README.md "What the log says"."""

    STOPPED = "stopped"
    CONNECTING = "connecting"
    SETTING_UP = "setting up"
    CONSUMING = "consuming"
    PAUSED = "paused"
    WAITING = "waiting to reconnect"
    STOPPING = "stopping"
    FAILED = "failed"


class Event(enum.Enum):
    """What can happen to the service."""

    CONNECT = "connect"  # a connection attempt starts
    CONNECTED = "connected"  # the AMQP handshake finished
    SET_UP = "set up"  # channels open, queue declared, subscribed
    SET_UP_PAUSED = "set up, paused"  # likewise, while the consumer stays paused
    SETUP_FAILED = "setup failed"  # a reconnect may fix it
    SETUP_FATAL = "setup fatal"  # retrying cannot fix it
    SUBSCRIPTION_LOST = "subscription lost"  # a channel closed or the broker cancelled us
    LOST = "lost"  # the connection (or the attempt) ended
    LOST_FATAL = "lost, fatal"  # ended in a way retrying cannot fix (access refused)
    RETRY = "retry"  # the next attempt is scheduled
    PAUSE = "pause"  # the consumer paused (a failing downstream, or the operator)
    RESUME = "resume"  # the consumer takes messages again
    FAIL = "fail"  # a fatal error: give up
    STOP = "stop"  # stopService
    HURRY = "hurry"  # a second signal while stopping
    STOP_DONE = "stop done"  # drained and closed, or overdue


class Action(enum.Enum):
    """What a transition does besides being observed; each names an `Actions` method."""

    ATTACH = "attach"
    CLOSE = "close"
    SUCCEEDED = "succeeded"
    GIVE_UP = "give_up"
    BEGIN_STOP = "begin_stop"
    HURRY = "hurry_stop"
    FINISH_STOP = "finish_stop"


@dataclass(frozen=True)
class Facts:
    """What came with an event: each event fills in the fields it has."""

    #: The connection the event is about, if any.
    connection: Any = None
    #: For LOST: it is the service's current connection (not an older one).
    current: bool = False
    #: For LOST: the AMQP handshake had finished (lost, rather than could not connect).
    opened: bool = False
    cause: Cause | None = None
    #: A reason in words: a setup failure's, a lost subscription's, a pause's cause.
    reason: str = ""
    failure: Failure | None = None
    error: FatalError | None = None
    #: For RETRY: the delay and the attempt.
    delay: float = 0.0
    attempt: int = 0
    #: For STOP: messages in flight; for HURRY: what hurried it.
    inflight: int = 0
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
    """The next state and the actions, in order, for one state and event."""

    after: State
    actions: tuple[Action, ...] = ()


class Observer(Protocol):
    """Sees every transition taken, after the state changed and before its actions run."""

    def __call__(self, transition: Transition, /) -> None: ...


class Actions(Protocol):
    """Carries out the actions a row names (the service)."""

    def attach(self, transition: Transition) -> None: ...
    def close(self, transition: Transition) -> None: ...
    def succeeded(self, transition: Transition) -> None: ...
    def give_up(self, transition: Transition) -> None: ...
    def begin_stop(self, transition: Transition) -> None: ...
    def hurry_stop(self, transition: Transition) -> None: ...
    def finish_stop(self, transition: Transition) -> None: ...


S, E, A = State, Event, Action
#: Where the connection may be lost or give up: before a stop or a failure.
_ACTIVE = (S.CONNECTING, S.SETTING_UP, S.CONSUMING, S.PAUSED, S.WAITING)
#: Where nothing more is recovered: a lost connection is only a debug line.
_ENDING = (S.STOPPING, S.STOPPED, S.FAILED)
#: A pause or a resume outside CONSUMING/PAUSED is only observed: the consumer remembers it.
_ELSEWHERE = (S.STOPPED, S.CONNECTING, S.SETTING_UP, S.WAITING, S.STOPPING, S.FAILED)

#: Every transition there is. Anything else is ignored.
TABLE: Mapping[tuple[State, Event], Row] = {
    (S.STOPPED, E.CONNECT): Row(S.CONNECTING),
    (S.WAITING, E.CONNECT): Row(S.CONNECTING),
    (S.CONNECTING, E.CONNECTED): Row(S.SETTING_UP, (A.ATTACH,)),
    (S.STOPPING, E.CONNECTED): Row(S.STOPPING, (A.CLOSE,)),
    (S.STOPPED, E.CONNECTED): Row(S.STOPPED, (A.CLOSE,)),  # too late: the stop is over
    (S.FAILED, E.CONNECTED): Row(S.FAILED, (A.CLOSE,)),
    (S.SETTING_UP, E.SET_UP): Row(S.CONSUMING, (A.SUCCEEDED,)),
    (S.SETTING_UP, E.SET_UP_PAUSED): Row(S.PAUSED, (A.SUCCEEDED,)),
    (S.SETTING_UP, E.SETUP_FAILED): Row(S.SETTING_UP, (A.CLOSE,)),
    (S.SETTING_UP, E.SETUP_FATAL): Row(S.FAILED, (A.GIVE_UP,)),
    (S.CONSUMING, E.SUBSCRIPTION_LOST): Row(S.WAITING, (A.CLOSE,)),
    (S.PAUSED, E.SUBSCRIPTION_LOST): Row(S.WAITING, (A.CLOSE,)),
    **{(s, E.LOST): Row(S.WAITING) for s in _ACTIVE},
    **{(s, E.LOST): Row(s) for s in _ENDING},
    **{(s, E.LOST_FATAL): Row(S.FAILED, (A.GIVE_UP,)) for s in _ACTIVE},
    **{(s, E.LOST_FATAL): Row(s) for s in _ENDING},
    (S.WAITING, E.RETRY): Row(S.WAITING),
    (S.CONSUMING, E.PAUSE): Row(S.PAUSED),
    (S.PAUSED, E.PAUSE): Row(S.PAUSED),  # the operator takes over a pause
    (S.PAUSED, E.RESUME): Row(S.CONSUMING),
    (S.CONSUMING, E.RESUME): Row(S.CONSUMING),
    **{(s, E.PAUSE): Row(s) for s in _ELSEWHERE},
    **{(s, E.RESUME): Row(s) for s in _ELSEWHERE},
    **{(s, E.FAIL): Row(S.FAILED, (A.GIVE_UP,)) for s in State if s is not S.FAILED},
    **{(s, E.STOP): Row(S.STOPPING, (A.BEGIN_STOP,)) for s in (S.STOPPED, *_ACTIVE)},
    (S.FAILED, E.STOP): Row(S.FAILED, (A.BEGIN_STOP,)),
    (S.STOPPING, E.HURRY): Row(S.STOPPING, (A.HURRY,)),
    (S.FAILED, E.HURRY): Row(S.FAILED, (A.HURRY,)),
    (S.STOPPING, E.STOP_DONE): Row(S.STOPPED, (A.FINISH_STOP,)),
    (S.FAILED, E.STOP_DONE): Row(S.FAILED, (A.FINISH_STOP,)),
}
del S, E, A


class Machine:
    """The current state, moved only by `fire` through `TABLE`, and who watches it."""

    def __init__(
        self,
        actions: Actions,
        state: State = State.STOPPED,
        table: Mapping[tuple[State, Event], Row] = TABLE,
    ) -> None:
        self.state = state
        self._actions = actions
        self._table = table
        self._observers: list[Observer] = []

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Have ``observer`` see every transition from now on; returns the unsubscribe."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    def fire(self, event: Event, facts: Facts | None = None) -> Transition | None:
        """Take the row for the current state and ``event``; None (and nothing done) without one."""
        row = self._table.get((self.state, event))
        if row is None:
            return None
        transition = Transition(self.state, event, row.after, facts or Facts())
        self.state = row.after
        for observer in list(self._observers):
            observer(transition)
        for action in row.actions:
            getattr(self._actions, action.value)(transition)
        return transition
