"""The consumer service: connection, recovery, shutdown and fatal exits, as one IService."""

from __future__ import annotations

import atexit
import contextlib
import enum
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
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ._amqp import AMQPConnection, AMQPFactory, Cause, Lost, connection_parameters
from ._backoff import Backoff
from ._consumer import Consumer, SetupFailed
from ._errors import AccessRefused, ExitStatus, FatalError
from ._handler import Handler, Invoker
from ._health import HealthFactory, Metrics, health_site
from ._log import bridge_pika_logging
from ._notify import Notifier
from ._secrets import install as install_redaction
from ._settings import Settings
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


class State(enum.Enum):
    """Where the service is; see README.md "What the log says"."""

    STOPPED = "stopped"
    CONNECTING = "connecting"
    SETTING_UP = "setting up"
    CONSUMING = "consuming"
    WAITING = "waiting to reconnect"
    STOPPING = "stopping"
    FAILED = "failed"


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
    reactor.callWhenRunning(reactor.stop)


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
        self.state = State.STOPPED
        self.exit_status: ExitStatus | None = None
        #: The broker blocked our connection (a resource alarm): publishing waits.
        self.blocked = False
        self._reactor = reactor
        self._random = random
        self._exit = exit or functools.partial(exit_process, reactor=reactor)
        self._connection: AMQPConnection | None = None
        self.notifier = notifier or Notifier()
        self._ready_sent = False
        self._last_cause = ""
        self._watchdog: LoopingCall | None = None
        self._signals = signals
        self._signalled = False
        #: While stopping: when the stop must be over, the Deferred it fires, and its timer.
        self._stop_by = 0.0
        self._stop_done: Deferred[None] | None = None
        self._overdue: IDelayedCall | None = None
        self.threadpool = _DaemonThreadPool(0, settings.threads, "consumer_svc-blocking")
        self.invoker = Invoker(handler, reactor, self.threadpool)
        self.consumer = Consumer(settings, self.invoker, reactor, self._subscription_lost)
        self.metrics = Metrics(inflight=lambda: len(self.consumer.inflight))
        self.consumer.on_outcome = self.metrics.settled
        self.consumer.on_handled = self.metrics.handled
        self.consumer.on_fatal = self._fatal
        self.consumer.on_paused = self._paused
        #: Install SIGTSTP (pause) and SIGCONT (resume) handlers when started.
        self._signals = signals
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

    # -- starting

    def startService(self) -> None:
        super().startService()
        install_redaction()
        bridge_pika_logging()
        s = self.settings
        log.info(
            "Starting: queue {queue!r} on {url}, handler {handler}{kind}, prefetch {prefetch}",
            queue=s.queue,
            url=", ".join(str(url) for url in s.urls),
            handler=self.invoker.name,
            kind=" (blocking, in threads)" if self.invoker.blocking else "",
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
        import signal

        def pause(signum: int, frame: object) -> None:
            self._reactor.callFromThread(
                self.consumer.pause, "paused by the operator (SIGTSTP)", by_operator=True
            )

        def resume(signum: int, frame: object) -> None:
            if self.consumer.paused is not None and self.consumer.paused.by_operator:
                self._reactor.callFromThread(self.consumer.resume)

        signal.signal(signal.SIGTSTP, pause)
        signal.signal(signal.SIGCONT, resume)

    def _paused(self, cause: str | None) -> None:
        """The consumer paused (with its cause) or resumed (None): tell everyone who watches."""
        self.metrics.paused.set(0 if cause is None else 1)
        if cause is None:
            self.notifier.notify(STATUS=f"Consuming queue {self.settings.queue}")
        else:
            self.metrics.pauses.inc()
            self.notifier.notify(STATUS=f"Paused: {cause}")

    def _watchdog_ping(self) -> None:
        # This runs, so the reactor is responsive; the connection is healthy
        # or being recovered as designed unless we gave up.
        if self.state is not State.FAILED:
            self.notifier.notify(WATCHDOG=1)

    # -- what the connection tells us (ConnectionListener)

    def amqp_connecting(self) -> None:
        if self.state in (State.STOPPING, State.FAILED):
            return
        self.state = State.CONNECTING
        url = self.factory.url
        self.notifier.notify(STATUS=f"Connecting to {url.host}:{url.port}")
        log.info(
            "Connecting to {host}:{port} (vhost {vhost!r})",
            host=url.host,
            port=url.port,
            vhost=url.vhost,
        )

    def amqp_ready(self, connection: AMQPConnection) -> None:
        self._connection = connection
        if self.state in (State.STOPPING, State.FAILED):
            connection.shutdown(CLOSE_TIMEOUT)
            return
        self.state = State.SETTING_UP
        self.metrics.connections.inc()
        self.metrics.connected.set(1)
        log.info(
            "Connected to {url} (heartbeat {heartbeat}s)",
            url=str(self.factory.url),
            heartbeat=self.settings.heartbeat,
        )
        d: Deferred[Any] = self.consumer.attach(connection)
        d.addCallbacks(self._consuming, self._setup_failed, errbackArgs=(connection,))

    def _consuming(self, _: object) -> None:
        if self.state is not State.SETTING_UP:
            return
        self.state = State.CONSUMING
        self.factory.succeeded()
        self.metrics.reconnect_delay.set(0)
        status = f"Consuming queue {self.settings.queue}"
        if self._ready_sent:
            self.notifier.notify(STATUS=status)
        else:
            self._ready_sent = True
            self.notifier.notify(READY=1, STATUS=status)
        log.info(
            "Consuming queue {queue!r} (prefetch {prefetch})",
            queue=self.settings.queue,
            prefetch=self.settings.prefetch,
        )

    def _setup_failed(self, failure: Failure, connection: AMQPConnection) -> None:
        if self.state in (State.STOPPING, State.FAILED) or connection.lost:
            return  # amqp_lost tells the story
        if failure.check(FatalError):
            self._fatal(failure.value)  # type: ignore[arg-type]
            return
        if failure.check(SetupFailed):
            log.warn(
                "Setting up the consumer failed: {reason}; reconnecting",
                reason=failure.getErrorMessage(),
            )
        else:
            log.failure("Setting up the consumer failed; reconnecting", failure)
        connection.shutdown(CLOSE_TIMEOUT)

    def _subscription_lost(self, reason: str) -> None:
        """The channel closed or the broker cancelled us while connected: start afresh."""
        if self.state is not State.CONSUMING:
            return
        self.state = State.WAITING
        log.warn(
            "Lost the consumer of queue {queue!r}: {reason}; reconnecting",
            queue=self.settings.queue,
            reason=reason,
        )
        if self._connection is not None:
            self._connection.shutdown(CLOSE_TIMEOUT)

    def amqp_lost(self, connection: AMQPConnection | None, cause: Cause) -> None:
        if connection is not None and connection is self._connection:
            self._connection = None
            self.blocked = self.consumer.publisher.blocked = False
            self.metrics.connected.set(0)
        self.consumer.detach()
        if self.state in (State.STOPPING, State.STOPPED, State.FAILED):
            log.debug("Connection closed: {cause}", cause=str(cause))
            return
        if cause.fatal:
            self._fatal(AccessRefused(str(cause)))
            return
        self._last_cause = str(cause)
        was = self.state
        self.state = State.WAITING
        opened = connection is not None and connection.opened
        log.warn(
            "{what} {host}:{port}: {cause}",
            what="Lost the connection to" if opened else "Could not connect to",
            host=self.factory.url.host,
            port=self.factory.url.port,
            cause=cause.detail if cause.kind is Lost.CONNECT_FAILED else str(cause),
            lost=cause.kind.name,
            previous_state=was.value,
        )

    def amqp_retrying(self, delay: float, attempt: int) -> None:
        self.metrics.reconnect_delay.set(delay)
        self.notifier.notify(
            STATUS=f"Reconnecting in {delay:.1f}s (attempt {attempt}): {self._last_cause}"
        )
        log.info("Reconnecting in {delay:.1f}s (attempt {attempt})", delay=delay, attempt=attempt)

    def amqp_blocked(self, blocked: bool, reason: str) -> None:
        self.blocked = self.consumer.publisher.blocked = blocked
        if blocked:
            log.warn("The broker blocked the connection: {reason}", reason=reason)
        else:
            log.info("The broker unblocked the connection")

    def readiness(self) -> tuple[bool, str]:
        """Ready while consuming; the state in words either way (for /readyz)."""
        state = self.state.value + (", blocked by the broker" if self.blocked else "")
        paused = self.consumer.paused
        if self.state is State.CONSUMING and paused is not None:
            return False, f"paused: {paused.cause}"
        return self.state is State.CONSUMING, state

    def health_site(self) -> HealthFactory:
        """The HTTP site for --health-port: /healthz, /readyz, /metrics."""
        return health_site(self.metrics, self.readiness)

    # -- giving up

    def _fatal(self, error: FatalError) -> None:
        if self.state is State.FAILED:
            return
        self.state = State.FAILED
        self.exit_status = error.status
        log.critical(
            "Giving up, retrying cannot fix this: {reason} (exit status {status})",
            reason=str(error),
            status=int(error.status),
        )
        self.factory.stopTrying()
        self.notifier.notify(STATUS=f"Failed (exit status {int(error.status)}): {error}")
        if self._connection is not None:
            self._connection.shutdown(CLOSE_TIMEOUT)
        self._exit(error.status)

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
        if self.state not in (State.STOPPING, State.FAILED) or self._stop_done is None:
            return
        log.warn(
            "{why} again while stopping: handing back what is in flight now, then closing "
            "(at most {grace:g}s more)",
            why=why,
            grace=CLOSE_TIMEOUT,
        )
        self.consumer.hurry()
        self._shorten_stop(CLOSE_TIMEOUT)

    def _shorten_stop(self, seconds: float) -> None:
        by = self._reactor.seconds() + seconds
        if by >= self._stop_by:
            return
        self._stop_by = by
        if self._overdue is not None and self._overdue.active():
            self._overdue.reset(seconds)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.state is not State.FAILED:
            self.state = State.STOPPING
        self.factory.stopTrying()
        connector = self.factory.connector
        if self._connection is None and connector is not None:
            with contextlib.suppress(net_errors.NotConnectingError):
                connector.stopConnecting()
        inflight = len(self.consumer.inflight)
        self.notifier.notify(STOPPING=1, STATUS=f"Draining {inflight} in-flight message(s)")
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        timeout = self.settings.shutdown_timeout
        log.info(
            "Stopping: {count} message(s) in flight, waiting up to {timeout:g}s for them",
            count=inflight,
            timeout=timeout,
        )
        # One deadline for the whole stop: the drain, then the close with what is left.
        budget = timeout + STOP_GRACE
        self._stop_by = self._reactor.seconds() + budget
        done: Deferred[None] = Deferred()
        self._stop_done = done
        self._overdue = self._reactor.callLater(budget, self._stop_overdue)
        d = self.consumer.drain(timeout)
        d.addCallback(lambda _: self._close())
        d.addErrback(lambda failure: log.failure("Stopping failed", failure))
        d.addCallback(lambda _: self._stopped())
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
        done, self._stop_done = self._stop_done, None
        if done is None:
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
        if self.state is not State.FAILED:
            self.state = State.STOPPED
        self.notifier.notify(STATUS="Stopped")
        self.notifier.close()
        log.info("Stopped")
        done.callback(None)
