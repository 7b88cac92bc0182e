"""Handlers: finding them, marking blocking ones, and calling them."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Sequence
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
    if not callable(target):
        raise HandlerImportError(
            f"--handler {reference!r} is a {type(target).__name__}, not a callable"
        )
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
            return deferToThreadPool(self._reactor, self._threadpool, self.handler, message)
        result = self.handler(message)
        if inspect.iscoroutine(result):
            return Deferred.fromCoroutine(result)
        return result
