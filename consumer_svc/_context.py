"""Carrying ``contextvars`` (a trace's span, say) into callbacks that Twisted runs later."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def keep_context(call: Callable[..., T]) -> Callable[..., T]:
    """Wrap a callback so that it runs in the context current now (inside a handler: its span).

    For Deferred callbacks that the reactor fires after the handler returned, e.g.
    ``task.deferLater(reactor, 1, keep_context(step))``: Twisted runs those in the
    reactor's own context (twisted#9807), where the handler's span is not current.
    Coroutines and ``@inlineCallbacks`` need no help. Each call runs in a fresh copy.
    """
    captured = contextvars.copy_context()

    def run(*args: Any, **kwargs: Any) -> T:
        return captured.copy().run(call, *args, **kwargs)

    return run
