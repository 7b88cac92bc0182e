"""The consumer service: connection, recovery, shutdown and fatal exits, as one IService."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import random
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet import error as net_errors
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ._backoff import Backoff
from ._causes import Cause
from ._connection import AMQPConnection
from ._consumer import Consumer
from ._errors import AccessRefused, ExitStatus
from ._handler import Handler, Invoker
from ._health import HealthFactory, Metrics, health_site
from ._log import bridge_pika_logging
from ._notify import Notifier
from ._observers import LogLines, MetricsObserver, Readiness, SystemdStatus
from ._parameters import connection_parameters
from ._reconnect import AMQPFactory
from ._secrets import install as install_redaction
from ._settings import Settings
from ._states import Action, Event, Facts, Machine, State, Transition
from ._tls import tls_options

if TYPE_CHECKING:
    from ._tracing import Tracing

log = Logger(namespace="consumer_svc")

#: Seconds the AMQP close handshake may take before the socket is aborted, outside a stop.
CLOSE_TIMEOUT = 5.0
#: Seconds a stop may take beyond --shutdown-timeout: the close handshake (which carries the
#: acks owed) gets whatever is left of ``shutdown_timeout + STOP_GRACE``; at that point the
#: stop is over whatever is still pending, so the process ends within --shutdown-timeout + 5 s.
STOP_GRACE = 4.5


class _DaemonThreadPool(ThreadPool):
    """Threads for `blocking` handlers; daemonic, so one stuck past the shutdown deadline cannot keep the process alive."""

    threadFactory = functools.partial(threading.Thread, daemon=True)  # type: ignore[assignment]

    def stop(self) -> None:
        """Let idle threads quit, without waiting for busy ones.

        `ThreadPool.stop` joins every thread: one stuck in a handler whose
        message was already retried (--handler-timeout) or handed back would
        hold the stop for ever. Daemon threads end with the process.
        """
        self.joined = True
        self.started = False
        self._team.quit()


def exit_process(status: ExitStatus, reactor: Any) -> None:
    """Stop the reactor (a clean shutdown runs), then end the process with ``status``.

    twistd has no way to choose its exit status, so the status is applied by
    an atexit hook that runs after twistd has removed its pidfile.
    """

    def hard_exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(status))

    atexit.register(hard_exit)

    def stop() -> None:
        with contextlib.suppress(net_errors.ReactorNotRunning):  # stopping already
            reactor.stop()

    reactor.callWhenRunning(stop)


def _tracing() -> Tracing | None:
    """Tracing as the standard OTEL_* environment configures it; None without opentelemetry."""
    try:
        from ._tracing import configure
    except ImportError:  # the [otel] extra is not installed
        return None
    return configure()


class ConsumerService(Service):
    """Consumes ``settings.queue`` with ``handler`` until stopped, reconnecting as needed.

    With ``signals`` (twistd), a second SIGTERM or SIGINT during the stop hurries it (`hurry`).
    """

    name = "consumer"

    def __init__(
        self,
        settings: Settings,
        handler: Handler,
        *,
        reactor: Any = None,
        random: Callable[[], float] = random.random,
        exit: Callable[[ExitStatus], None] | None = None,
        notifier: Notifier | None = None,
        signals: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.settings = settings
        self.handler = handler
        self.exit_status: ExitStatus | None = None
        #: The broker blocked our connection (a resource alarm): publishing waits.
        self.blocked = False
        self._reactor = reactor
        self._random = random
        self._exit = exit or functools.partial(exit_process, reactor=reactor)
        self._connection: AMQPConnection | None = None
        self.notifier = notifier or Notifier()
        self._watchdog: LoopingCall | None = None
        #: Install the signal handlers when started (twistd): SIGTERM/SIGINT, SIGTSTP/SIGCONT.
        self._signals = signals
        self._signalled = False
        #: While stopping: when the stop must be over, the Deferred it fires, and its timer.
        self._stop_by = 0.0
        self._stop_done: Deferred[None] | None = None
        self._overdue: IDelayedCall | None = None
        #: Where the service and its consumer are: moved only through `consumer_svc._states.TABLE`.
        self.machine = Machine()
        self.threadpool = _DaemonThreadPool(0, settings.threads, "consumer_svc-blocking")
        self.invoker = Invoker(handler, reactor, self.threadpool)
        self.consumer = Consumer(settings, self.invoker, reactor, self.machine)
        self.metrics = Metrics(inflight=lambda: len(self.consumer.inflight))
        self.consumer.on_outcome = self.metrics.settled
        self.consumer.on_handled = self.metrics.handled
        self.factory = AMQPFactory(
            settings.urls,
            lambda url: connection_parameters(
                url,
                heartbeat=settings.heartbeat,
                name=f"consumer_svc {settings.queue}",
                client_certificate=bool(settings.tls_cert),
            ),
            listener=self,
            reactor=reactor,
            backoff=Backoff(settings.reconnect_initial, settings.reconnect_max),
            random=random,
            timeout=settings.connect_timeout,
            tls=tls_options(settings) if any(u.tls for u in settings.urls) else None,
        )
        self._readiness = Readiness()
        url = lambda: self.factory.url  # noqa: E731 - the URL current when a line is written
        for observer in (
            LogLines(settings, url, grace=CLOSE_TIMEOUT),
            SystemdStatus(self.notifier, settings, url),
            MetricsObserver(self.metrics),
            self._readiness,
        ):
            self.machine.subscribe(observer)
        for action, performer in (
            (Action.CLOSE, self._close_connection),
            (Action.SUCCEEDED, lambda _: self.factory.succeeded()),
            (Action.GIVE_UP, self._give_up),
            (Action.BEGIN_STOP, self._begin_stop),
            (Action.HURRY_STOP, self._hurry_stop),
            (Action.FINISH_STOP, self._finish_stop),
        ):
            self.machine.perform(action, performer)

    @property
    def state(self) -> State:
        """Where the service is (README.md "States")."""
        return self.machine.state

    # -- starting

    def startService(self) -> None:
        super().startService()
        install_redaction()
        bridge_pika_logging()
        s = self.settings
        log.info(
            "Starting: queue {queue!r} on {url}, handler {handler}{kind}, concurrency "
            "{concurrency}, prefetch {prefetch}",
            queue=s.queue,
            url=", ".join(str(url) for url in s.urls),
            handler=self.invoker.name,
            kind=" (blocking, in threads)" if self.invoker.blocking else "",
            concurrency=s.concurrency,
            prefetch=s.prefetch,
        )
        self.consumer.tracing = _tracing()
        if self.consumer.tracing is not None:
            log.info("Tracing: a span for each message and each publish (OpenTelemetry)")
        self.threadpool.start()
        if self._signals:
            self._install_pause_signals()
        if self.notifier.watchdog_interval:
            self._watchdog = LoopingCall(self._watchdog_ping)
            self._watchdog.clock = self._reactor
            self._watchdog.start(self.notifier.watchdog_interval, now=False)
        if self._signals:
            self._reactor.callWhenRunning(self._take_signals)
        self.factory.connect()

    def _install_pause_signals(self) -> None:
        """SIGTSTP pauses the consumer (no probes), SIGCONT resumes it: the operator's switch."""

        def pause(signum: int, frame: object) -> None:
            self._reactor.callFromThread(
                self.consumer.pause, "paused by the operator (SIGTSTP)", by_operator=True
            )

        def resume(signum: int, frame: object) -> None:
            self._reactor.callFromThread(self._operator_resume)

        signal.signal(signal.SIGTSTP, pause)
        signal.signal(signal.SIGCONT, resume)

    def _operator_resume(self) -> None:
        """SIGCONT ends the operator's pause (not one a failing downstream began)."""
        paused = self.consumer.paused
        if paused is not None and paused.by_operator:
            self.consumer.resume()

    def _watchdog_ping(self) -> None:
        # This runs, so the reactor is responsive; the connection is healthy
        # or being recovered as designed unless we gave up.
        if self.state is not State.FAILED:
            self.notifier.notify(WATCHDOG=1)

    # -- what the connection tells us (ConnectionListener): each an event

    def amqp_connecting(self) -> None:
        self.machine.fire(Event.CONNECT)

    def amqp_ready(self, connection: AMQPConnection) -> None:
        self._connection = connection
        self.machine.fire(Event.CONNECTED, Facts(connection=connection))

    def amqp_lost(self, connection: AMQPConnection | None, cause: Cause) -> None:
        current = connection is not None and connection is self._connection
        if current:
            self._connection = None
            self.blocked = self.consumer.publisher.blocked = False
        self.consumer.detach()
        if cause.fatal and self.state not in (State.STOPPING, State.STOPPED):
            self.machine.fire(Event.FAIL, Facts(error=AccessRefused(str(cause))))
            return
        facts = Facts(
            connection=connection,
            current=current,
            opened=connection is not None and connection.opened,
            cause=cause,
        )
        self.machine.fire(Event.LOST, facts)

    def amqp_retrying(self, delay: float, attempt: int) -> None:
        self.machine.fire(Event.RETRY, Facts(delay=delay, attempt=attempt))

    def amqp_blocked(self, blocked: bool, reason: str) -> None:
        self.blocked = self.consumer.publisher.blocked = blocked
        if blocked:
            log.warn("The broker blocked the connection: {reason}", reason=reason)
        else:
            log.info("The broker unblocked the connection")

    def readiness(self) -> tuple[bool, str]:
        """Ready while consuming; the state in words either way (for /readyz)."""
        return self._readiness.readiness(self.blocked)

    def health_site(self) -> HealthFactory:
        """The HTTP site for --health-port: /healthz, /readyz, /metrics."""
        return health_site(self.metrics, self.readiness)

    # -- the actions the table gives the service

    def _close_connection(self, transition: Transition) -> None:
        """Close the event's connection (else the current one), to start afresh."""
        connection = transition.facts.connection or self._connection
        if connection is not None:
            connection.shutdown(CLOSE_TIMEOUT)

    def _give_up(self, transition: Transition) -> None:
        """Retrying cannot fix this: stop reconnecting, close, end the process with its status."""
        error = transition.facts.error
        assert error is not None
        self.exit_status = error.status
        self.factory.stopTrying()
        if self._connection is not None:
            self._connection.shutdown(CLOSE_TIMEOUT)
        self._exit(error.status)

    def _begin_stop(self, transition: Transition) -> None:
        """Stop reconnecting, drain what is in flight and close, all within one deadline."""
        self.factory.stopTrying()
        connector = self.factory.connector
        if self._connection is None and connector is not None:
            with contextlib.suppress(net_errors.NotConnectingError):
                connector.stopConnecting()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        timeout = transition.facts.timeout
        # One deadline for the whole stop: the drain, then the close with what is left.
        budget = timeout + STOP_GRACE
        self._stop_by = self._reactor.seconds() + budget
        self._overdue = self._reactor.callLater(budget, self._stop_overdue)
        d = self.consumer.drain(timeout)
        d.addCallback(lambda _: self._close())
        d.addErrback(lambda failure: log.failure("Stopping failed", failure))
        d.addCallback(lambda _: self._stopped())

    def _hurry_stop(self, transition: Transition) -> None:
        """Hand back what is in flight now and bound the close (a second signal)."""
        self.consumer.hurry()
        self._shorten_stop(CLOSE_TIMEOUT)

    def _finish_stop(self, transition: Transition) -> None:
        """The stop is over: fire the Deferred stopService returned."""
        done, self._stop_done = self._stop_done, None
        if done is not None:
            done.callback(None)

    # -- stopping

    def _take_signals(self) -> None:
        """Handle SIGTERM and SIGINT ourselves: the first stops as twistd does, a second one hurries the stop.

        Without this a second signal calls ``reactor.stop`` again, which raises
        ``ReactorNotRunning`` (a critical traceback) and does nothing else.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(number)
            if not callable(previous):
                continue  # not Twisted's: leave it alone (SIG_IGN, or a debugger's default)
            signal.signal(number, functools.partial(self._on_signal, previous))

    def _on_signal(self, previous: Callable[[int, Any], Any], number: int, frame: Any) -> None:
        # Stopping already (a first signal, or a fatal error stopping the reactor):
        # Twisted's handler would only call reactor.stop again.
        if self._signalled or not self.running:
            self._reactor.callFromThread(self.hurry, signal.Signals(number).name)
            return
        self._signalled = True
        previous(number, frame)

    def hurry(self, why: str = "asked") -> None:
        """End the drain now, as at the deadline (a second SIGTERM or SIGINT calls this).

        The handlers still running are abandoned and their messages handed
        back; the acks owed are still sent, and the close may take at most
        `CLOSE_TIMEOUT` seconds more.
        """
        self.machine.fire(Event.HURRY, Facts(why=why))

    def _shorten_stop(self, seconds: float) -> None:
        by = self._reactor.seconds() + seconds
        if by >= self._stop_by:
            return
        self._stop_by = by
        if self._overdue is not None and self._overdue.active():
            self._overdue.reset(seconds)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.state is State.STOPPING:
            return succeed(None)  # the first stop goes on
        done: Deferred[None] = Deferred()
        self._stop_done = done
        facts = Facts(inflight=len(self.consumer.inflight), timeout=self.settings.shutdown_timeout)
        self.machine.fire(Event.STOP, facts)
        return done

    def _close(self) -> Deferred[None]:
        connection = self._connection
        if connection is None:
            return succeed(None)
        self.consumer.flush()
        # The close handshake is what carries the acks owed to the broker (pika
        # closes each channel first): it gets all the time the stop has left,
        # never a fixed few seconds that a busy broker could overrun.
        left = max(self._stop_by - self._reactor.seconds() - 0.25, 0.1)
        log.info("Closing the AMQP connection (waiting up to {left:.1f}s)", left=left)
        return connection.shutdown(left)

    def _stop_overdue(self) -> None:
        self._overdue = None
        log.warn(
            "The stop is overdue (--shutdown-timeout {timeout:g}s + {grace:g}s): ending it now",
            timeout=self.settings.shutdown_timeout,
            grace=STOP_GRACE,
        )
        connection = self._connection
        if connection is not None and connection.transport is not None:
            connection.transport.abortConnection()
        self._stopped()

    def _stopped(self) -> None:
        if self._stop_done is None:
            return  # ended already (overdue)
        if self._overdue is not None and self._overdue.active():
            self._overdue.cancel()
        self._overdue = None
        busy = len(self.threadpool.working)
        if busy:
            log.warn(
                "{count} blocking handler thread(s) still running past the deadline; abandoned",
                count=busy,
            )
        self.threadpool.stop()
        self.machine.fire(Event.STOP_DONE)
