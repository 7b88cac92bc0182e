"""What the service declares: the work queue (with its exchange and bindings) and the queues
it owns for failed messages, its retry queues and its dead-letter queue.

The work queue is declared on the consuming channel while setting up, and a
refusal is turned into what happens next (`setup_error`). The failure queues
are declared (or, with ``--no-declare``, checked passively) apart from
consuming: each on a channel of its own that is closed afterwards, so a
refused declare (a node down, no permission, a missing queue) closes only
that channel, never the one messages come from or the one copies are
published on. A queue that cannot be declared now is reported once and tried
again at its next use; meanwhile the failures meant for it are handed back
to the broker, never dropped. Only a queue that exists with other arguments
than ours is fatal: retrying cannot fix it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pika import exceptions as pika_errors
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._channel import Channel
from ._errors import AccessRefused, ConfigurationError, SetupFailed, TopologyMismatch
from ._retry import REDECLARE_AFTER, RetryPolicy, dead_letter_arguments, retry_queue

if TYPE_CHECKING:
    from ._settings import Settings

log = Logger(namespace="consumer_svc.topology")
#: RabbitMQ's 406 for an argument value of the wrong type or range (not a mismatch).
_INVALID_ARG = re.compile(r"invalid arg '([^']+)'")


def declare_work_queue(channel: Channel, s: Settings) -> Deferred[Any]:
    """Declare the work queue, its exchange and bindings (with --no-declare: check the queue)."""
    if not s.declare:
        return channel.declare_queue(s.queue, passive=True, arguments={})

    @inlineCallbacks
    def declare() -> Any:
        yield channel.declare_queue(s.queue, arguments=s.queue_arguments)
        if s.exchange:
            yield channel.declare_exchange(s.exchange, s.exchange_type)
            for key in s.routing_keys or ("",):
                yield channel.bind(s.queue, s.exchange, key)

    return declare()


def setup_error(e: pika_errors.ChannelClosedByBroker, s: Settings) -> Exception:
    """What a refusal while setting up means: a `FatalError` retrying cannot fix, else `SetupFailed`."""
    text = f"{e.reply_code} {e.reply_text}"
    if e.reply_code == 403:
        return AccessRefused(
            f"the broker refused an operation on queue {s.queue!r}: {text} "
            f"(user {s.url.username!r}, vhost {s.url.vhost!r})"
        )
    invalid = _INVALID_ARG.search(e.reply_text) if e.reply_code == 406 else None
    if invalid and invalid.group(1) in s.queue_arguments:
        key = invalid.group(1)
        return ConfigurationError(
            f"--queue-arg {key}={s.queue_arguments[key]!r} is not a valid value for "
            f"{key}: the broker refused it ({text})"
        )
    if e.reply_code == 406:
        return TopologyMismatch(
            f"queue {s.queue!r} or its exchange exists with other arguments than configured "
            f"(we declare {dict(s.queue_arguments)!r}): {text}"
        )
    if e.reply_code == 404 and not s.declare:
        return SetupFailed(f"queue {s.queue!r} does not exist (--no-declare): {text}")
    return SetupFailed(text)


def failure_targets(s: Settings, policy: RetryPolicy) -> list[tuple[str, dict[str, Any]]]:
    """The dead-letter queue and the retry queues the schedule uses, with their arguments."""
    targets = [(s.dead_letter_queue, dead_letter_arguments(s.queue_arguments))]
    for retry in range(1, s.max_retries + 1):
        target = retry_queue(s.queue, policy.schedule(retry))
        if target not in targets:
            targets.append(target)
    return targets


class ChannelOpener(Protocol):
    def open_channel(self) -> Deferred[Channel]: ...


@dataclass
class _Known:
    """What we know of one queue on the current connection."""

    #: When it was last declared or found (the clock's seconds), or None.
    ready_at: float | None = None
    #: Why it could not be declared, while it cannot.
    problem: str | None = None
    #: Those waiting for the declare under way.
    waiters: list[Deferred[bool]] = field(default_factory=list)


@dataclass
class FailureQueues:
    """Declares (or checks) the retry and dead-letter queues on demand, one channel each."""

    clock: IReactorTime
    #: Declare them (False: --no-declare, only check that they exist).
    declare: bool
    #: Called with a `TopologyMismatch`: the service must stop.
    on_fatal: Callable[[TopologyMismatch], None]
    connection: ChannelOpener | None = None
    _known: dict[str, _Known] = field(default_factory=dict)

    def attach(self, connection: ChannelOpener) -> None:
        """A new connection: nothing is known to exist until declared on it."""
        self.connection = connection
        self._known = {}

    def detach(self) -> None:
        self.connection = None
        self._known = {}

    def check(self, targets: list[tuple[str, dict[str, Any]]]) -> None:
        """Declare (or check) each of ``targets``; name in one warning those that are not there."""
        checks = [self.ensure(name, arguments, quiet=True) for name, arguments in targets]

        def report(results: list[bool]) -> None:
            missing = [
                f"{name} ({self.problem(name)})"
                for (name, _), ok in zip(targets, results)
                if not ok and self.problem(name)
            ]
            if missing:
                log.warn(
                    "Not available for failed messages: {missing}; until they are, failed "
                    "messages meant for them are handed back to the broker",
                    missing="; ".join(missing),
                )

        gatherResults(checks).addCallback(report)

    def problem(self, name: str) -> str | None:
        """Why ``name`` is unavailable, if it is."""
        known = self._known.get(name)
        return None if known is None else known.problem

    def ensure(
        self, name: str, arguments: Mapping[str, Any], *, quiet: bool = False
    ) -> Deferred[bool]:
        """Fires True once ``name`` is declared (recently enough), False if it cannot be now.

        A queue that becomes unavailable is logged once (unless ``quiet``),
        and again when it is back.
        """
        known = self._known.setdefault(name, _Known())
        if known.ready_at is not None and self.clock.seconds() - known.ready_at < REDECLARE_AFTER:
            return succeed(True)
        waiter: Deferred[bool] = Deferred()
        known.waiters.append(waiter)
        if len(known.waiters) > 1:
            return waiter  # a declare is under way: share its answer
        connection = self.connection
        if connection is None:
            self._finish(known, False)
            return waiter

        def declared(_: object) -> None:
            if known.problem is not None:
                log.info("Queue {queue} is available", queue=name)
            known.ready_at, known.problem = self.clock.seconds(), None
            self._finish(known, True)

        def failed(failure: Failure) -> None:
            problem = self._problem(name, arguments, failure)
            if problem is not None:
                if known.problem is None and not quiet:
                    log.warn(
                        "Queue {queue} is not available: {problem}; failed messages meant for it "
                        "are handed back to the broker until it is",
                        queue=name,
                        problem=problem,
                    )
                known.problem = problem
            self._finish(known, False)

        self._declare_on_own_channel(connection, name, arguments).addCallbacks(declared, failed)
        return waiter

    @staticmethod
    def _finish(known: _Known, result: bool) -> None:
        waiters, known.waiters = known.waiters, []
        for waiter in waiters:
            waiter.callback(result)

    def _declare_on_own_channel(
        self, connection: ChannelOpener, name: str, arguments: Mapping[str, Any]
    ) -> Deferred[None]:
        def declare(channel: Channel) -> Deferred[None]:
            d = channel.declare_queue(name, passive=not self.declare, arguments=arguments)

            def close(result: object) -> object:
                channel.close()
                return result

            return d.addBoth(close)

        return connection.open_channel().addCallback(declare)

    def _problem(self, name: str, arguments: Mapping[str, Any], failure: Failure) -> str | None:
        """Say why a declare failed; a mismatch is fatal (reported, and None returned)."""
        error = failure.value
        if isinstance(error, pika_errors.ChannelClosedByBroker):
            text = f"{error.reply_code} {error.reply_text}"
            if error.reply_code == 406 and self.declare:
                self.on_fatal(
                    TopologyMismatch(
                        f"queue {name!r} exists with other arguments: we declare "
                        f"{dict(arguments)!r}, the broker says {text}"
                    )
                )
                return None
            if error.reply_code == 404 and not self.declare:
                return f"it does not exist (--no-declare: declare it yourself): {text}"
            return text
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
