"""Who watches the service's transitions: its log lines, systemd, the metrics and readiness.

Each is an `Observer` of `consumer_svc._states.Machine` and changes nothing
but what it reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.logger import Logger

from ._causes import Lost
from ._errors import SetupFailed
from ._states import CONNECTED, ENDING, Event, State, Transition

if TYPE_CHECKING:
    from ._health import Metrics
    from ._notify import Notifier
    from ._settings import Settings
    from ._url import BrokerURL

log = Logger(namespace="consumer_svc")
#: The pause's lines have always been the consumer's.
consumer_log = Logger(namespace="consumer_svc.consumer")

_SET_UP = (Event.SET_UP, Event.SET_UP_PAUSED)


def _gave_up(t: Transition) -> bool:
    return t.event is Event.FAIL and t.facts.error is not None


class LogLines:
    """The service's log lines (README.md "What the log says")."""

    def __init__(self, settings: Settings, url: Callable[[], BrokerURL], grace: float) -> None:
        self._settings = settings
        self._url = url
        #: How long a hurried stop may still take (the close timeout).
        self._grace = grace

    def __call__(self, t: Transition) -> None:
        s, f, event = self._settings, t.facts, t.event
        if event is Event.CONNECT:
            url = self._url()
            log.info(
                "Connecting to {host}:{port} (vhost {vhost!r})",
                host=url.host,
                port=url.port,
                vhost=url.vhost,
            )
        elif event is Event.CONNECTED and t.after is State.SETTING_UP:
            log.info(
                "Connected to {url} (heartbeat {heartbeat}s)",
                url=str(self._url()),
                heartbeat=s.heartbeat,
            )
        elif event in _SET_UP:
            log.info(
                "Consuming queue {queue!r} (prefetch {prefetch}){paused}",
                queue=s.queue,
                prefetch=s.prefetch,
                paused=f", paused: {f.reason}" if event is Event.SET_UP_PAUSED else "",
            )
        elif event is Event.SETUP_FAILED:
            failure = f.failure
            if failure is None or failure.check(SetupFailed):
                log.warn(
                    "Setting up the consumer failed: {reason}; reconnecting",
                    reason=failure.getErrorMessage() if failure is not None else f.reason,
                )
            else:
                log.failure("Setting up the consumer failed; reconnecting", failure)
        elif event is Event.SUBSCRIPTION_LOST:
            log.warn(
                "Lost the consumer of queue {queue!r}: {reason}; reconnecting",
                queue=s.queue,
                reason=f.reason,
            )
        elif event is Event.LOST:
            self._lost(t)
        elif event is Event.RETRY:
            log.info(
                "Reconnecting in {delay:.1f}s (attempt {attempt})",
                delay=f.delay,
                attempt=f.attempt,
            )
        elif event in (Event.PAUSE, Event.PROBE, Event.PROBE_FAILED, Event.RESUME):
            self._pause(t)
        elif event is Event.FAIL and _gave_up(t):
            assert f.error is not None
            log.critical(
                "Giving up, retrying cannot fix this: {reason} (exit status {status})",
                reason=str(f.error),
                status=int(f.error.status),
            )
        elif event is Event.STOP:
            log.info(
                "Stopping: {count} message(s) in flight, waiting up to {timeout:g}s for them",
                count=f.inflight,
                timeout=f.timeout,
            )
        elif event is Event.HURRY:
            log.warn(
                "{why} again while stopping: handing back what is in flight now, then closing "
                "(at most {grace:g}s more)",
                why=f.why,
                grace=self._grace,
            )
        elif event is Event.STOP_DONE:
            log.info("Stopped")

    def _lost(self, t: Transition) -> None:
        cause = t.facts.cause
        if t.before in ENDING or cause is None:
            log.debug("Connection closed: {cause}", cause=str(cause))
            return
        url = self._url()
        log.warn(
            "{what} {host}:{port}: {cause}",
            what="Lost the connection to" if t.facts.opened else "Could not connect to",
            host=url.host,
            port=url.port,
            cause=cause.detail if cause.kind is Lost.CONNECT_FAILED else str(cause),
            lost=cause.kind.name,
            previous_state=t.before.value,
        )

    def _pause(self, t: Transition) -> None:
        f, event = t.facts, t.event
        if event is Event.PAUSE and f.by_operator:
            consumer_log.warn(
                "Paused: {cause}; send SIGCONT to resume", cause=f.reason, pause_cause=f.reason
            )
        elif event is Event.PAUSE:
            consumer_log.warn(
                "Paused: {cause}; no new messages until one succeeds again, trying one in {delay:g}s",
                cause=f.reason,
                delay=f.delay,
                pause_cause=f.reason,
            )
        elif event is Event.PROBE:
            consumer_log.info("Paused: trying one message ({cause})", cause=f.reason)
        elif event is Event.PROBE_FAILED:
            consumer_log.warn(
                "Still paused: the probe failed ({reason}); trying again in {delay:g}s",
                reason=f.reason,
                delay=f.delay,
            )
        else:
            consumer_log.info("Resuming after a pause ({cause})", cause=f.reason)


class SystemdStatus:
    """READY, STATUS and STOPPING for systemd (README.md "Running under systemd")."""

    def __init__(
        self, notifier: Notifier, settings: Settings, url: Callable[[], BrokerURL]
    ) -> None:
        self.notifier = notifier
        self._settings = settings
        self._url = url
        self._ready_sent = False
        #: The cause of the last loss, for the "Reconnecting" status.
        self._last_cause = ""

    def __call__(self, t: Transition) -> None:
        f, event, notify = t.facts, t.event, self.notifier.notify
        consuming = f"Consuming queue {self._settings.queue}"
        if event is Event.CONNECT:
            url = self._url()
            notify(STATUS=f"Connecting to {url.host}:{url.port}")
        elif event in _SET_UP:
            status = consuming if event is Event.SET_UP else f"Paused: {f.reason}"
            if self._ready_sent:
                notify(STATUS=status)
            else:
                self._ready_sent = True
                notify(READY=1, STATUS=status)
        elif event is Event.LOST and t.before not in ENDING:
            self._last_cause = str(f.cause)
        elif event is Event.RETRY:
            notify(
                STATUS=f"Reconnecting in {f.delay:.1f}s (attempt {f.attempt}): {self._last_cause}"
            )
        elif event is Event.PAUSE and t.after is State.PAUSED:
            notify(STATUS=f"Paused: {f.reason}")
        elif event is Event.RESUME and t.after is State.CONSUMING:
            notify(STATUS=consuming)
        elif event is Event.FAIL and _gave_up(t):
            assert f.error is not None
            notify(STATUS=f"Failed (exit status {int(f.error.status)}): {f.error}")
        elif event is Event.STOP:
            notify(STOPPING=1, STATUS=f"Draining {f.inflight} in-flight message(s)")
        elif event is Event.STOP_DONE:
            notify(STATUS="Stopped")
            self.notifier.close()


class MetricsObserver:
    """The connection, reconnect and pause metrics (README.md "Metrics")."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def __call__(self, t: Transition) -> None:
        m, f, event = self.metrics, t.facts, t.event
        if event is Event.CONNECTED and t.after is State.SETTING_UP:
            m.connections.inc()
            m.connected.set(1)
        elif event in _SET_UP:
            m.reconnect_delay.set(0)
            m.paused.set(1 if event is Event.SET_UP_PAUSED else 0)
        elif event is Event.LOST and f.current:
            m.connected.set(0)
        elif event is Event.RETRY:
            m.reconnect_delay.set(f.delay)
        elif event is Event.PAUSE:
            m.paused.set(1)
            if not f.again:
                m.pauses.inc()
        elif event is Event.RESUME:
            m.paused.set(0)


class Readiness:
    """Ready while consuming; the state in words either way (for /readyz)."""

    def __init__(self) -> None:
        self.state = State.STOPPED
        #: The pause's cause, while connected and paused.
        self.cause = ""

    def __call__(self, t: Transition) -> None:
        self.state = t.after
        if t.event in (Event.PAUSE, Event.SET_UP_PAUSED) and t.after in CONNECTED:
            self.cause = t.facts.reason

    def readiness(self, blocked: bool) -> tuple[bool, str]:
        """Whether the service is ready, and why in words; ``blocked`` by the broker, as it says."""
        if self.state in (State.PAUSED, State.PROBING):
            return False, f"paused: {self.cause}"
        words = self.state.value + (", blocked by the broker" if blocked else "")
        return self.state is State.CONSUMING, words
