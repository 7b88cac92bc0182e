"""Handlers: finding them, marking blocking ones, and calling them."""

from __future__ import annotations

import contextvars
import importlib
import inspect
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

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
    """
    setattr(handler, _BLOCKING, True)
    return handler


def is_blocking(handler: Callable[..., Any]) -> bool:
    """Whether `blocking` marked this handler."""
    return bool(getattr(handler, _BLOCKING, False))


def describe(handler: Callable[..., Any]) -> str:
    """A handler's dotted name, for log lines."""
    module = getattr(handler, "__module__", None) or "?"
    name = getattr(handler, "__qualname__", None) or repr(handler)
    return f"{module}.{name}"


def load_handler(reference: str) -> Handler:
    """Import ``package.module:function`` (or ``package.module.function``).

    The current directory is searched last, like ``python -m`` would search it
    first, so that a handler next to the working directory can be found
    without installing it. Raises `HandlerImportError` with one readable line.
    """
    if ":" in reference:
        module_name, _, attribute = reference.partition(":")
    else:
        module_name, _, attribute = reference.rpartition(".")
    if not module_name or not attribute:
        raise HandlerImportError(
            f"--handler {reference!r} is not of the form package.module:function"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as e:  # the user's module may raise anything while importing
        raise HandlerImportError(
            f"cannot import handler module {module_name!r} for --handler {reference!r}: "
            f"{type(e).__name__}: {e}"
        ) from e
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerImportError(
                f"module {module_name!r} has no attribute {attribute!r} (--handler {reference!r})"
            ) from None
    if not callable(target):
        raise HandlerImportError(
            f"--handler {reference!r} is a {type(target).__name__}, not a callable"
        )
    return target  # type: ignore[no-any-return]


def log_message(message: Message) -> None:
    """The built-in handler: log the message's routing key, size and a preview, then ack it."""
    preview = message.body[:_PREVIEW]
    log.info(
        "Message {delivery_tag} routing_key={routing_key!r} size={size} body={preview!r}{more}",
        delivery_tag=message.delivery_tag,
        routing_key=message.routing_key,
        size=len(message.body),
        preview=preview,
        more="…" if len(message.body) > _PREVIEW else "",
    )


class Invoker:
    """Calls the handler the right way for its kind.

    Returns the plain result of a synchronous handler as it is (no Deferred on
    the fast path), a Deferred for a Deferred-returning handler, a Deferred
    wrapping a coroutine, or a Deferred from the thread pool for a `blocking`
    handler. A synchronous exception propagates to the caller.
    """

    def __init__(self, handler: Handler, reactor: Any, threadpool: ThreadPool) -> None:
        self.handler = handler
        self.name = describe(handler)
        self.blocking = is_blocking(handler)
        self._reactor = reactor
        self._threadpool = threadpool

    def __call__(self, message: Message) -> Any:
        if self.blocking:
            # The thread runs in a copy of our context (a trace's span, say), as asyncio.to_thread does.
            run = contextvars.copy_context().run
            return deferToThreadPool(self._reactor, self._threadpool, run, self.handler, message)
        result = self.handler(message)
        if inspect.iscoroutine(result):
            return Deferred.fromCoroutine(result)
        return result
