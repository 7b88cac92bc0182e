"""Handlers: refused at start when they cannot run as written, called the right way for their kind.

Plain unit tests: a Clock for the reactor, a thread pool that runs at once, and for the
asyncio reactor's way a private asyncio loop (the test reactor is never touched).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pika.spec import BasicProperties
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

import consumer_svc
from consumer_svc import ExitStatus, Message
from consumer_svc._errors import HandlerImportError
from consumer_svc._handler import AsyncioReactorRequired, Invoker, load_handler
from consumer_svc.testing import _fakes as fakes


class ThreadReactor(Clock):
    """A Clock whose callFromThread runs the call at once (the pool has no threads)."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class AsyncioReactor(ThreadReactor):
    """Stands in for Twisted's asyncio reactor: it names the asyncio loop it runs on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._asyncioEventloop = loop


def invoker(handler: Callable[[Message], Any], reactor: Clock | None = None) -> Invoker:
    """The real Invoker on a Clock (by default a ThreadReactor) and a pool without threads."""
    return fakes.invoker(handler, reactor or ThreadReactor())


def message() -> Message:
    return Message(
        b"x", BasicProperties(), delivery_tag=1, routing_key="q", exchange="", redelivered=False
    )


def outcome(d: Deferred[Any]) -> Any:
    """The result a Deferred already has: a value, or the Failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def finish(loop: asyncio.AbstractEventLoop, d: Deferred[Any]) -> Any:
    """Run ``loop`` until ``d`` fires (at most 5 s); its value, or its Failure."""
    results: list[Any] = []
    done = loop.create_future()

    def fired(result: object) -> None:
        results.append(result)
        done.set_result(None)

    d.addBoth(fired)
    loop.run_until_complete(asyncio.wait_for(done, 5))
    return results[0]


# -- refused at start


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """Writes a handler module of the test's own and returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    count = [0]

    def write(source: str) -> str:
        count[0] += 1
        name = f"handler_module_{tmp_path.name}_{count[0]}".replace("-", "_")
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    return write


def refusal(reference: str) -> str:
    with pytest.raises(HandlerImportError) as refused:
        load_handler(reference)
    assert refused.value.status is ExitStatus.HANDLER
    assert "\n" not in str(refused.value)
    return str(refused.value)


def test_a_generator_function_is_refused(module: Callable[[str], str]) -> None:
    """A generator function (its @inlineCallbacks forgotten) would be acked unrun: refused, naming the fix."""
    name = module("def handle(message):\n    yield message\n")
    says = refusal(f"{name}:handle")
    assert f"--handler '{name}:handle' is a generator function" in says
    assert "inlineCallbacks" in says


def test_a_generator_method_of_a_callable_object_is_refused(module: Callable[[str], str]) -> None:
    """An object whose __call__ is a generator function is refused as well."""
    name = module(
        """
        class Handler:
            def __call__(self, message):
                yield message

        handle = Handler()
        """
    )
    assert "is a generator function" in refusal(f"{name}:handle")


def test_an_async_generator_function_is_refused(module: Callable[[str], str]) -> None:
    """An async def with a yield makes an async generator, which nothing would run: refused."""
    name = module("async def handle(message):\n    yield message\n")
    assert "is an async generator function" in refusal(f"{name}:handle")


def test_a_coroutine_function_marked_blocking_is_refused_at_import(
    module: Callable[[str], str],
) -> None:
    """@blocking on an async def fails where it is written, so the handler's import fails with the reason."""
    name = module(
        """
        import consumer_svc

        @consumer_svc.blocking
        async def handle(message):
            pass
        """
    )
    says = refusal(f"{name}:handle")
    assert says.startswith(f"cannot import handler module {name!r}")
    assert "TypeError" in says
    assert "is a coroutine function marked @consumer_svc.blocking" in says


def test_blocking_refuses_what_a_thread_cannot_run() -> None:
    """The decorator itself refuses a coroutine function, a generator function and a non-callable."""

    async def coroutine_function(message: Message) -> None:
        pass

    def generator_function(message: Message) -> Iterator[None]:
        yield None

    with pytest.raises(TypeError, match="is a coroutine function marked"):
        consumer_svc.blocking(coroutine_function)
    with pytest.raises(TypeError, match="is a generator function marked"):
        consumer_svc.blocking(generator_function)
    with pytest.raises(
        TypeError, match=r"marked @consumer_svc\.blocking but a str, not a callable"
    ):
        consumer_svc.blocking("handle")  # type: ignore[type-var]  # the misuse under test


def test_a_non_callable_marked_blocking_is_refused(module: Callable[[str], str]) -> None:
    """A non-callable marked blocking (here by hand) is refused with both facts."""
    name = module(
        """
        class Settings:
            __consumer_svc_blocking__ = True

        handle = Settings()
        """
    )
    says = refusal(f"{name}:handle")
    assert says == (
        f"--handler '{name}:handle' is marked @consumer_svc.blocking but a Settings, not a callable"
    )


def test_runnable_handlers_of_every_kind_load(module: Callable[[str], str]) -> None:
    """A plain, an @inlineCallbacks, an async and a @blocking handler all load."""
    name = module(
        """
        import consumer_svc
        from twisted.internet.defer import inlineCallbacks

        def plain(message):
            pass

        @inlineCallbacks
        def generator(message):
            yield None

        async def coroutine(message):
            pass

        @consumer_svc.blocking
        def blocking(message):
            pass
        """
    )
    for function in ("plain", "generator", "coroutine", "blocking"):
        assert callable(load_handler(f"{name}:{function}"))


# -- what a handler returns at run time


def test_a_returned_generator_fails_the_call() -> None:
    """A handler returning a generator raises TypeError (the message is then retried), and the generator is closed."""
    ran: list[str] = []

    def make(message: Message) -> Iterator[None]:
        ran.append("body")
        yield None

    generator = make(message())
    assert inspect.isgenerator(generator)

    with pytest.raises(TypeError, match="returned a generator: nothing ran"):
        invoker(lambda m: generator)(message())
    assert ran == []
    assert generator.gi_frame is None  # closed


def test_an_inline_callbacks_handler_is_not_mistaken_for_a_generator() -> None:
    """@inlineCallbacks returns a Deferred, which is waited on as usual."""

    @inlineCallbacks
    def handle(message: Message) -> Any:
        yield succeed(None)
        return "done"

    assert outcome(invoker(handle)(message())) == "done"


def test_a_coroutine_from_a_blocking_thread_fails_the_message() -> None:
    """A @blocking handler that returns a coroutine fails (never acked), and the coroutine is closed unrun."""
    ran: list[str] = []

    async def work() -> None:
        ran.append("body")

    coroutine = work()
    assert inspect.iscoroutine(coroutine)
    handle = consumer_svc.blocking(lambda m: coroutine)
    failure = outcome(invoker(handle)(message()))
    assert isinstance(failure, Failure)
    assert failure.check(TypeError)
    assert "returned a coroutine from its @consumer_svc.blocking thread" in str(failure.value)
    assert ran == []
    assert coroutine.cr_frame is None  # closed: no "never awaited" warning


def test_a_deferred_or_generator_from_a_blocking_thread_fails_the_message() -> None:
    """A Deferred or a generator returned from a thread cannot be waited for there: the message fails."""

    def generator() -> Iterator[None]:
        yield None

    results: tuple[object, ...] = (Deferred(), generator())
    for result in results:
        handle = consumer_svc.blocking(lambda m, r=result: r)
        failure = outcome(invoker(handle)(message()))
        assert isinstance(failure, Failure), result
        assert failure.check(TypeError), result


def test_a_blocking_handler_s_plain_result_is_its_success() -> None:
    """A @blocking handler that returns a value succeeds with it."""
    assert outcome(invoker(consumer_svc.blocking(lambda m: 42))(message())) == 42


# -- coroutines and asyncio


def test_without_the_asyncio_reactor_awaiting_asyncio_says_to_use_it() -> None:
    """On another reactor, a coroutine awaiting asyncio fails in one line that says -r asyncio."""

    async def handle(message: Message) -> None:
        await asyncio.sleep(0.01)

    failure = outcome(invoker(handle)(message()))
    assert isinstance(failure, Failure)
    assert failure.check(AsyncioReactorRequired)
    text = str(failure.value)
    assert "\n" not in text
    assert "awaited asyncio code (no running event loop)" in text
    assert "twistd -r asyncio consumer" in text


def test_without_the_asyncio_reactor_coroutines_await_deferreds() -> None:
    """On the default reactors a coroutine runs as before: it awaits Deferreds."""
    gate: Deferred[int] = Deferred()

    async def handle(message: Message) -> int:
        return await gate + 1

    d = invoker(handle)(message())
    assert not d.called
    gate.callback(1)
    assert outcome(d) == 2


def test_under_the_asyncio_reactor_coroutines_await_asyncio_and_deferreds(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """With the asyncio reactor a coroutine is an asyncio task: asyncio.sleep, Deferreds and their failures all work."""

    async def handle(message: Message) -> tuple[int, str, bool]:
        await asyncio.sleep(0.001)
        fired: Deferred[int] = Deferred()
        loop.call_later(0.001, fired.callback, 5)
        value = await fired
        failing: Deferred[None] = Deferred()
        loop.call_later(0.001, failing.errback, ValueError("boom"))
        try:
            await failing
        except ValueError as e:
            reason = str(e)
        return value, reason, asyncio.current_task() is not None

    d = invoker(handle, AsyncioReactor(loop))(message())
    assert finish(loop, d) == (5, "boom", True)


def test_under_the_asyncio_reactor_a_handler_s_failure_fails_the_deferred(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """An exception raised in the task reaches the consumer as the Deferred's failure."""

    async def handle(message: Message) -> None:
        await asyncio.sleep(0)
        raise consumer_svc.Reject("malformed")

    failure = finish(loop, invoker(handle, AsyncioReactor(loop))(message()))
    assert isinstance(failure, Failure)
    assert failure.check(consumer_svc.Reject)


def test_asyncio_timeouts_work_around_deferreds(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio.timeout around an awaited Deferred raises TimeoutError in the handler and cancels the Deferred."""
    never: Deferred[None] = Deferred()

    async def handle(message: Message) -> str:
        try:
            async with asyncio.timeout(0.01):
                await never
        except TimeoutError:
            return "timed out"
        return "not timed out"

    assert finish(loop, invoker(handle, AsyncioReactor(loop))(message())) == "timed out"
    assert never.called


def test_cancelling_the_task_s_deferred_cancels_the_handler(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """--handler-timeout and the shutdown deadline cancel the Deferred: the handler sees asyncio's cancellation, the consumer Twisted's."""
    never: Deferred[None] = Deferred()
    seen: list[str] = []

    async def handle(message: Message) -> None:
        try:
            await never
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    d = invoker(handle, AsyncioReactor(loop))(message())
    loop.run_until_complete(asyncio.sleep(0.01))  # the task waits on the Deferred
    d.cancel()
    failure = finish(loop, d)
    assert isinstance(failure, Failure)
    assert failure.check(CancelledError)
    assert seen == ["cancelled"]
    assert never.called
