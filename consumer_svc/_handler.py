"""Handlers: finding them, marking blocking ones, and calling them."""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import os
import sys
import traceback
import types
from collections.abc import Awaitable, Generator, Sequence
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._errors import HandlerImportError

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool

    from ._message import Message

Handler = Callable[["Message"], Any]
F = TypeVar("F", bound=Callable[..., Any])

_BLOCKING = "__consumer_svc_blocking__"
_PREVIEW = 64
log = Logger(namespace="consumer_svc.handler")


def blocking(handler: F) -> F:
    """Mark a synchronous handler that may block: it runs in the service's thread pool.

    The reactor thread stays free to answer heartbeats however long the handler takes.
    The function itself is returned unchanged, so it can still be called directly.
    Raises `TypeError` for what a thread cannot run: a coroutine function, a
    generator function, or something that is not callable.
    """
    problem = unrunnable(handler, blocking=True)
    if problem is not None:
        name = describe(handler) if callable(handler) else repr(handler)[:80]
        raise TypeError(f"{name} {problem}")
    setattr(handler, _BLOCKING, True)
    return handler


def is_blocking(handler: object) -> bool:
    """Whether `blocking` marked this handler."""
    return bool(getattr(handler, _BLOCKING, False))


def unrunnable(handler: object, *, blocking: bool) -> str | None:
    """Why ``handler`` cannot run as written (the end of a sentence naming it), or None.

    A generator function only makes a generator, which nobody would run (its
    ``@inlineCallbacks`` is missing); a thread cannot run a coroutine function
    (it makes a coroutine nobody awaits); and only a callable can be called.
    """
    if not callable(handler):
        marked = "is marked @consumer_svc.blocking but" if blocking else "is"
        return f"{marked} a {type(handler).__name__}, not a callable"
    call = handler if inspect.isroutine(handler) else type(handler).__call__
    if inspect.isasyncgenfunction(handler) or inspect.isasyncgenfunction(call):
        return (
            "is an async generator function: calling it runs nothing; "
            "make it an async def that returns (no yield)"
        )
    if inspect.isgeneratorfunction(handler) or inspect.isgeneratorfunction(call):
        if blocking:
            return (
                "is a generator function marked @consumer_svc.blocking: the thread would only "
                "make a generator; make it a plain function (no yield)"
            )
        return (
            "is a generator function: calling it runs nothing; decorate it with "
            "@twisted.internet.defer.inlineCallbacks, or make it an async def"
        )
    if blocking and (inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)):
        return (
            "is a coroutine function marked @consumer_svc.blocking: a thread cannot await it; "
            "remove @consumer_svc.blocking (coroutines run in the reactor) or make it a plain def"
        )
    return None


def describe(handler: Callable[..., Any]) -> str:
    """A handler's dotted name, for log lines."""
    module = getattr(handler, "__module__", None) or "?"
    name = getattr(handler, "__qualname__", None) or repr(handler)
    return f"{module}.{name}"


def load_handler(reference: str, path: Sequence[str] = ()) -> Handler:
    """Import ``package.module:function`` (or ``package.module.function``).

    The directories in ``path`` (--handler-path) are searched first. The
    current directory is not searched unless it is named there: a module
    planted in whatever directory the service starts in must not run.
    Raises `HandlerImportError` with one readable line, naming the file and
    line of an error raised while importing.
    """
    if ":" in reference:
        module_name, _, attribute = reference.partition(":")
    else:
        module_name, _, attribute = reference.rpartition(".")
    if not module_name or not attribute:
        raise HandlerImportError(
            f"--handler {reference!r} is not of the form package.module:function"
        )
    for directory in reversed(path):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as e:  # the user's module may raise anything while importing
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        where = _where(e)
        raise HandlerImportError(
            f"cannot import handler module {module_name!r} for --handler {reference!r}: "
            f"{type(e).__name__}{': ' + text if text else ''}{f' ({where})' if where else ''}"
        ) from e
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerImportError(
                f"module {module_name!r} has no attribute {attribute!r} (--handler {reference!r})"
            ) from None
    problem = unrunnable(target, blocking=is_blocking(target))
    if problem is not None:
        raise HandlerImportError(f"--handler {reference!r} {problem}")
    return target  # type: ignore[no-any-return]


_STDLIB = os.path.dirname(os.__file__)


def _where(error: BaseException) -> str:
    """``file, line N`` of the error: the syntax error's own, else the innermost frame of the
    handler's code (not Python's import machinery, the standard library or this module)."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}, line {error.lineno}"
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        name = frame.filename
        stdlib = name.startswith(_STDLIB + os.sep) and "site-packages" not in name
        if name.startswith("<") or name == __file__ or stdlib:
            continue
        return f"{name}, line {frame.lineno}"
    return ""


def log_message(message: Message) -> None:
    """The built-in handler: log the message's routing key, size and a preview, then ack it."""
    preview = message.body[:_PREVIEW]
    log.info(
        "Handled {message_name}: routing_key={routing_key!r} size={size} body={preview!r}{more}",
        message_name=message.name,
        delivery_tag=message.delivery_tag,
        routing_key=message.routing_key,
        size=len(message.body),
        preview=preview,
        more="…" if len(message.body) > _PREVIEW else "",
    )


class AsyncioReactorRequired(Exception):
    """A coroutine handler awaited asyncio code while another reactor than asyncio's runs."""


#: What asyncio raises when it finds no running loop of its own (or its futures are
#: awaited by Twisted's coroutine driver instead of an asyncio task).
_NO_ASYNCIO_LOOP = ("no running event loop", "await wasn't used with future")


def asyncio_loop(reactor: object) -> asyncio.AbstractEventLoop | None:
    """The asyncio event loop ``reactor`` runs on, if it is Twisted's asyncio reactor."""
    loop = getattr(reactor, "_asyncioEventloop", None)
    return loop if isinstance(loop, asyncio.AbstractEventLoop) else None


def run_as_task(awaitable: Awaitable[Any], loop: asyncio.AbstractEventLoop) -> Deferred[Any]:
    """Run a coroutine as an asyncio task on ``loop``; the Deferred has its result.

    Inside the task the handler may await asyncio code and Deferreds alike: a
    Deferred it awaits is waited on through a future of ``loop``. Cancelling the
    Deferred cancels the task; the handler sees `asyncio.CancelledError` (so
    ``asyncio.timeout`` and ``TaskGroup`` behave), and the Deferred fails with
    Twisted's `CancelledError`, as any cancelled handler's does.
    """
    task = loop.create_task(_await(_bridge(awaitable.__await__(), loop)))

    def cancelled(failure: Failure) -> Failure:
        if failure.check(asyncio.CancelledError):
            return Failure(CancelledError())
        return failure

    return Deferred.fromFuture(task).addErrback(cancelled)


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


@types.coroutine
def _bridge(
    inner: Generator[Any, Any, Any], loop: asyncio.AbstractEventLoop
) -> Generator[Any, Any, Any]:
    """Drive ``inner`` inside an asyncio task, turning each Deferred it yields into a future.

    A Deferred yields itself while it has no result; the task, which only knows
    futures, waits instead on a future that a pass-through callback completes
    when the Deferred fires (its result stays in the Deferred, where the
    handler's ``await`` reads it). Everything else goes to the task unchanged.
    """
    send: Any = None
    throw: BaseException | None = None
    while True:
        try:
            yielded = inner.send(send) if throw is None else inner.throw(throw)
        except StopIteration as done:
            return done.value
        send, throw = None, None
        waiting = yielded if isinstance(yielded, Deferred) else None
        try:
            if waiting is None:
                send = yield yielded  # asyncio's own futures, or a bare yield
            else:
                waiter: asyncio.Future[None] = loop.create_future()
                waiting.addBoth(_wake, waiter)
                yield from waiter
        except GeneratorExit:
            inner.close()
            raise
        except BaseException as e:  # the task's cancellation, above all
            if waiting is not None and isinstance(e, asyncio.CancelledError):
                waiting.cancel()
                waiting.addErrback(lambda _: None)  # the handler sees the task's cancellation
            throw = e


def _wake(result: object, waiter: asyncio.Future[None]) -> object:
    if not waiter.done():
        waiter.set_result(None)
    return result


def _misused_result(result: object, where: str) -> str | None:
    """Why a handler's result cannot stand for its work, or None; closes what it names."""
    if inspect.isgenerator(result):
        result.close()
        return (
            f"returned a generator{where}: nothing ran (is @inlineCallbacks missing?); "
            "the message is not acked"
        )
    if inspect.isasyncgen(result):
        return f"returned an async generator{where}: nothing ran; the message is not acked"
    if where and (inspect.isawaitable(result) or isinstance(result, Deferred)):
        if inspect.iscoroutine(result):
            result.close()
        return (
            f"returned a {type(result).__name__}{where}, which nothing can wait for there: "
            "a @consumer_svc.blocking handler must do its work before it returns"
        )
    return None


class Invoker:
    """Calls the handler the right way for its kind.

    Returns the plain result of a synchronous handler as it is (no Deferred on
    the fast path), a Deferred for a Deferred-returning handler, a Deferred
    wrapping a coroutine (an asyncio task under the asyncio reactor), or a
    Deferred from the thread pool for a `blocking` handler. A synchronous
    exception propagates to the caller; so does a `TypeError` for a result that
    cannot stand for the work (a generator; anything awaitable from a thread).
    """

    def __init__(self, handler: Handler, reactor: Any, threadpool: ThreadPool) -> None:
        self.handler = handler
        self.name = describe(handler)
        self.blocking = is_blocking(handler)
        self._reactor = reactor
        self._threadpool = threadpool
        self._loop = asyncio_loop(reactor)

    def __call__(self, message: Message) -> Any:
        if self.blocking:
            # The thread runs in a copy of our context (a trace's span, say), as asyncio.to_thread does.
            run = contextvars.copy_context().run
            return deferToThreadPool(self._reactor, self._threadpool, run, self._in_thread, message)
        result = self.handler(message)
        if isinstance(result, Deferred):
            return result
        problem = _misused_result(result, "")
        if problem is not None:
            raise TypeError(f"handler {self.name} {problem}")
        if inspect.isawaitable(result):
            if self._loop is not None:
                return run_as_task(result, self._loop)
            coroutine = result if inspect.iscoroutine(result) else _await(result)
            return Deferred.fromCoroutine(coroutine).addErrback(self._needs_asyncio)
        return result

    def _in_thread(self, message: Message) -> Any:
        result = self.handler(message)
        problem = _misused_result(result, " from its @consumer_svc.blocking thread")
        if problem is not None:
            raise TypeError(f"handler {self.name} {problem}")
        return result

    def _needs_asyncio(self, failure: Failure) -> Failure:
        error = failure.value
        if isinstance(error, RuntimeError) and str(error) in _NO_ASYNCIO_LOOP:
            raise AsyncioReactorRequired(
                f"handler {self.name} awaited asyncio code ({error}), which needs the asyncio "
                "reactor: run twistd -r asyncio consumer ..."
            ) from error
        return failure
