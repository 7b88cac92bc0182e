"""Waiting in tests, always with a deadline, and in Twisted tests without blocking the reactor.

pytest-twisted has no per-test timeout (pytest-timeout only ends the whole run), so every
test that waits for something goes through :func:`eventually` or :func:`within` (inside the
reactor) or :func:`poll_until` (plain synchronous tests). Importing this module does not
import the reactor.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast, overload

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

__all__ = ["Timeout", "eventually", "poll_until", "within"]

T = TypeVar("T")


class Timeout(AssertionError):
    """Something a test waited for did not happen before its deadline."""


def _clock(clock: IReactorTime | None) -> IReactorTime:
    if clock is not None:
        return clock
    # Imported late: pytest-twisted installs the reactor chosen with --reactor first.
    from twisted.internet import reactor

    return cast(IReactorTime, reactor)


def within(
    seconds: float,
    d: Deferred[T],
    what: str = "",
    *,
    cancel: bool = False,
    clock: IReactorTime | None = None,
) -> Deferred[T]:
    """Return a Deferred with ``d``'s result, or failing with :class:`Timeout` after ``seconds``.

    ``d`` is handed over: use the returned Deferred instead. By default ``d`` is not cancelled
    at the deadline, because cancelling a pika channel RPC Deferred breaks the channel's close
    handling (pika issue #1282); pass ``cancel=True`` for Deferreds that cancel cleanly. A
    result that arrives after the deadline is dropped.
    """
    clock = _clock(clock)
    result: Deferred[T] = Deferred()

    def time_out() -> None:
        result.errback(Timeout(f"{what or repr(d)} did not happen within {seconds} s"))
        if cancel:
            d.cancel()

    call = clock.callLater(seconds, time_out)

    def done(outcome: T | Failure) -> None:
        if not call.active():
            return None  # too late: the test has failed already; drop it
        call.cancel()
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)
        return None

    d.addBoth(done)
    return result


# A predicate that gives an awaitable (a Deferred, a coroutine) is awaited: eventually gives
# what the awaitable does.
@overload
async def eventually(
    predicate: Callable[[], Awaitable[T]],
    timeout: float,
    interval: float = ...,
    what: str = ...,
    *,
    blocking: bool = ...,
    clock: IReactorTime | None = ...,
) -> T: ...


@overload
async def eventually(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = ...,
    what: str = ...,
    *,
    blocking: bool = ...,
    clock: IReactorTime | None = ...,
) -> T: ...


async def eventually(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float,
    interval: float = 0.05,
    what: str = "",
    *,
    blocking: bool = False,
    clock: IReactorTime | None = None,
) -> T:
    """Call ``predicate`` until it gives a true value; return that value.

    ``predicate`` may return a plain value, a Deferred or a coroutine (awaited, within the
    time left). With ``blocking=True`` it runs in a thread (``deferToThread``), for
    predicates that block, such as ``RabbitNode.list_queues``. An ``AssertionError`` it
    raises counts as "not yet". At the deadline this raises :class:`Timeout` naming ``what``
    and the last value or error seen. Use it from ``@pytest_twisted.ensureDeferred`` tests,
    or as ``Deferred.fromCoroutine(eventually(...))`` from ``inlineCallbacks`` ones.
    """
    clock = _clock(clock)
    deadline = clock.seconds() + timeout
    description = what or getattr(predicate, "__name__", repr(predicate))
    while True:
        try:
            if blocking:
                from twisted.internet.threads import deferToThread

                value: Any = deferToThread(predicate)
            else:
                value = predicate()
            if isinstance(value, Deferred) or inspect.isawaitable(value):
                pending = (
                    value
                    if isinstance(value, Deferred)
                    else Deferred.fromCoroutine(cast(Coroutine[Any, Any, T], value))
                )
                left = max(deadline - clock.seconds(), 0.001)
                value = await within(left, pending, f"{description} (pending call)", clock=clock)
        except AssertionError as e:
            last: object = e
        else:
            if value:
                return cast(T, value)
            last = value
        now = clock.seconds()
        if now >= deadline:
            raise Timeout(f"{description}: still not true after {timeout} s; last: {last!r}")
        await task.deferLater(clock, min(interval, deadline - now), lambda: None)


def poll_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.05, message: str = ""
) -> T:
    """Call ``predicate`` until it returns a true value, and return that value (blocking).

    For synchronous tests and helper threads only; inside the reactor use :func:`eventually`.
    An ``AssertionError`` from the predicate counts as "not yet". At the deadline this raises
    :class:`Timeout` (an ``AssertionError``) with ``message`` and the last value or error seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except AssertionError as e:
            last: object = e
        else:
            if value:
                return value
            last = value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise Timeout(f"{what}: still not true after {timeout} s; last: {last!r}")
        time.sleep(min(interval, remaining))
