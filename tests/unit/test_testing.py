"""The testing kit (consumer_svc.testing): handlers run by the service's own rules, no broker.

Its fakes are checked against the real objects' public methods here, so they cannot drift.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import threading
from typing import Any

import pytest
import pytest_twisted
from pika.spec import BasicProperties
from twisted.internet import task
from twisted.internet.defer import Deferred

import consumer_svc
from consumer_svc import Message, Reject, Retry
from consumer_svc.testing import (
    Confirm,
    FakeChannel,
    FakeConnection,
    Outcome,
    Result,
    Runner,
    message,
)


def _result(outcome: Result | Deferred[Result]) -> Result:
    assert isinstance(outcome, Result), f"expected a result at once, got {outcome!r}"
    return outcome


def _fired(d: Result | Deferred[Result]) -> Result:
    assert isinstance(d, Deferred), f"expected a Deferred, got {d!r}"
    results: list[Result] = []
    d.addCallback(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


# -- the public surface


def test_the_public_names_of_the_kit_are_pinned() -> None:
    """consumer_svc.testing exports exactly these names, and each resolves."""
    import consumer_svc.testing as kit

    assert kit.__all__ == [
        "Confirm",
        "FakeChannel",
        "FakeConnection",
        "Incoming",
        "Outcome",
        "Parked",
        "Publish",
        "Result",
        "Retried",
        "Runner",
        "message",
    ]
    for name in kit.__all__:
        assert getattr(kit, name) is not None


def test_the_public_names_of_the_package_are_pinned() -> None:
    """consumer_svc exports exactly what a handler author needs, keep_context included."""
    assert consumer_svc.__all__ == [
        "ExitStatus",
        "Message",
        "Pause",
        "PublishFailed",
        "Reject",
        "Retry",
        "UndecodableBody",
        "blocking",
        "json_lines",
        "keep_context",
    ]


def _public(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in vars(cls).items()
        if not name.startswith("_") and (callable(member) or isinstance(member, property))
    }


def _parameters(function: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_fake_channel_has_every_method_of_the_real_one() -> None:
    """Each public method and property of _channel.Channel exists on FakeChannel, with the same parameters."""
    from consumer_svc._channel import Channel

    fake = FakeChannel()
    for name, member in _public(Channel).items():
        assert hasattr(fake, name), f"FakeChannel lacks {name}"
        if callable(member):
            assert _parameters(getattr(FakeChannel, name)) == _parameters(member), name


def test_the_fake_connection_offers_what_the_service_uses_of_the_real_one() -> None:
    """FakeConnection's open_channel and shutdown match AMQPConnection's; both have `opened` and `lost`."""
    from consumer_svc._connection import AMQPConnection

    for name in ("open_channel", "shutdown"):
        assert _parameters(getattr(FakeConnection, name)) == _parameters(
            getattr(AMQPConnection, name)
        ), name
    source = inspect.getsource(AMQPConnection.__init__)
    assert "self.opened = False" in source
    assert "self.lost = False" in source
    fake = FakeConnection()
    assert (fake.opened, fake.lost) == (True, False)


def test_every_outcome_of_the_consumer_has_a_name_in_the_kit() -> None:
    """A new consumer outcome must be mapped in the kit before this passes (PAUSED is a hand-back while paused)."""
    from consumer_svc._outcome import Outcome as Settled
    from consumer_svc.testing._kit import _SETTLED_AS

    assert set(_SETTLED_AS) == set(Settled)
    assert set(_SETTLED_AS.values()) | {Outcome.PAUSED} == set(Outcome)


def test_importing_the_kit_and_its_plugin_installs_no_reactor() -> None:
    """pytest imports the plugin before pytest-twisted picks a reactor: neither may import one."""
    code = (
        "import sys, consumer_svc.testing, consumer_svc.testing.pytest_plugin; "
        "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported'; "
        "assert 'pika.adapters.twisted_connection' not in sys.modules, 'adapter imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- outcomes


def test_a_plain_handler_that_returns_is_acked_at_once() -> None:
    """The result of a plain handler is there as soon as run() returns."""
    result = _result(Runner(lambda m: None).run(message(b"job")))
    assert result.outcome is Outcome.ACKED
    assert result.error is None
    assert result.copy is None


def test_the_message_built_is_the_one_the_handler_sees() -> None:
    """Body, headers, properties, routing key, exchange and redelivered reach the handler."""
    seen: list[Message] = []
    incoming = message(
        "héllo",
        headers={"tenant": "a"},
        properties=BasicProperties(message_id="m-1", reply_to="r"),
        routing_key="jobs.new",
        exchange="jobs",
        redelivered=True,
    )
    _result(Runner(seen.append).run(incoming))
    [m] = seen
    assert m.body == "héllo".encode()
    assert m.headers == {"tenant": "a"}
    assert m.properties.message_id == "m-1"
    assert (m.routing_key, m.exchange, m.redelivered) == ("jobs.new", "jobs", True)


def test_a_failure_is_retried_on_the_schedule_s_first_rung() -> None:
    """An exception sends a copy to <queue>.retry.5s with the retry count, and says why."""

    def handler(m: Message) -> None:
        raise RuntimeError("database down")

    result = _result(Runner(handler, queue="tasks").run(message(b"job")))
    assert result.outcome is Outcome.RETRIED
    assert result.reason == "RuntimeError: database down"
    assert isinstance(result.error, RuntimeError)
    assert result.retried is not None
    assert (result.retried.queue, result.retried.delay, result.retried.retry) == (
        "tasks.retry.5s",
        5,
        1,
    )
    assert result.copy is not None
    assert result.copy.body == b"job"


def test_a_later_retry_waits_longer() -> None:
    """The third attempt waits 20 s with a 5 s retry delay."""

    def handler(m: Message) -> None:
        raise RuntimeError("still down")

    result = _result(Runner(handler).run(message(headers={"consumer-svc-retries": 2})))
    assert result.retried is not None
    assert (result.retried.delay, result.retried.retry) == (20, 3)


def test_retry_with_its_own_delay_rounds_up_to_the_ladder() -> None:
    """Retry(delay=3) asks for 3 s and waits on the 5 s rung."""

    def handler(m: Message) -> None:
        raise Retry("rate limited", delay=3)

    result = _result(Runner(handler).run(message()))
    assert result.retried is not None
    assert (result.retried.wanted, result.retried.delay) == (3, 5)
    assert result.retried.queue == "queue.retry.5s"


def test_reject_parks_the_message_with_why() -> None:
    """Reject parks at once in the dead-letter queue, with the reason in the copy."""

    def handler(m: Message) -> None:
        raise Reject("malformed")

    result = _result(Runner(handler, dead_letter_queue="parked").run(message(b"bad")))
    assert result.outcome is Outcome.PARKED
    assert result.parked is not None
    assert (result.parked.queue, result.parked.reason, result.parked.attempts) == (
        "parked",
        "Reject: malformed",
        1,
    )


def test_after_the_last_retry_the_message_is_parked() -> None:
    """With --max-retries 1, a message that failed once already is given up on."""

    def handler(m: Message) -> None:
        raise ValueError("bad payload")

    runner = Runner(handler, max_retries=1)
    result = _result(runner.run(message(headers={"consumer-svc-retries": 1})))
    assert result.parked is not None
    assert result.parked.reason == "ValueError: bad payload (gave up after 2 attempts)"


def test_a_handler_s_publishes_are_reported_and_confirmed() -> None:
    """A forward is a Publish of the result; the message is acked once it was confirmed."""
    result = _result(Runner(lambda m: m.publish("out", "done", b"fwd") and None).run(message()))
    assert result.outcome is Outcome.ACKED
    [publish] = result.publishes
    assert (publish.exchange, publish.routing_key, publish.body) == ("out", "done", b"fwd")
    assert publish.confirm is Confirm.ACK
    assert not publish.copy


def test_a_nacked_publish_fails_the_handler() -> None:
    """A publish the broker nacks sends the message the retry way."""
    runner = Runner(
        lambda m: m.publish("out", "done", b"fwd") and None,
        confirm=lambda p: Confirm.ACK if p.copy else Confirm.NACK,
    )
    result = _result(runner.run(message()))
    assert result.outcome is Outcome.RETRIED
    assert (
        result.reason
        == "PublishFailed: the broker nacked the publish to exchange 'out' with routing key 'done'"
    )


def test_an_unroutable_mandatory_publish_fails_the_handler() -> None:
    """A mandatory publish returned as unroutable fails the message too."""
    runner = Runner(
        lambda m: m.publish("out", "nowhere", b"fwd", mandatory=True) and None,
        confirm=lambda p: Confirm.ACK if p.copy else Confirm.UNROUTABLE,
    )
    result = _result(runner.run(message()))
    assert result.outcome is Outcome.RETRIED
    assert result.reason is not None
    assert "unroutable" in result.reason


def test_a_publish_that_times_out_fails_after_the_publish_timeout() -> None:
    """An unanswered publish fails after --publish-timeout on the runner's clock."""
    runner = Runner(
        lambda m: m.publish("out", "done", b"fwd") and None,
        confirm=lambda p: Confirm.ACK if p.copy else Confirm.TIMEOUT,
        publish_timeout=7,
    )
    result = _result(runner.run(message()))
    assert result.outcome is Outcome.RETRIED
    assert result.seconds == 7
    assert runner.clock.getDelayedCalls() == []


def test_an_unconfirmed_copy_hands_the_message_back_after_a_pause() -> None:
    """No confirm for the retry copy: the original goes back to the broker, 1 s after the publish timeout."""

    def handler(m: Message) -> None:
        raise RuntimeError("boom")

    result = _result(Runner(handler, confirm=Confirm.TIMEOUT, publish_timeout=10).run(message()))
    assert result.outcome is Outcome.HANDED_BACK
    assert result.seconds == 11
    assert result.copy is not None
    assert result.copy.confirm is Confirm.TIMEOUT


def test_a_handler_that_asks_for_a_pause_is_seen_paused() -> None:
    """Pause("db down") hands the message back unharmed; the result says the service paused, and why."""

    def handler(m: Message) -> None:
        raise consumer_svc.Pause("db down", delay=30)

    result = _result(Runner(handler).run(message()))
    assert result.outcome is Outcome.PAUSED
    assert result.paused == "Pause: db down"
    assert result.copy is None


def test_undecodable_headers_are_parked_without_running_the_handler() -> None:
    """Headers the codec could not read park the message; the handler never sees it."""
    from consumer_svc._codec import UndecodableHeaders

    seen: list[Message] = []
    incoming = message(properties=BasicProperties(headers=UndecodableHeaders("a table ends")))
    result = _result(Runner(seen.append).run(incoming))
    assert result.outcome is Outcome.PARKED
    assert result.reason == "UndecodableHeaders: a table ends"
    assert seen == []


# -- handler kinds


def test_a_blocking_handler_runs_in_the_calling_thread_and_answers_at_once() -> None:
    """@blocking handlers run synchronously in the test's own thread."""
    threads: list[int] = []

    @consumer_svc.blocking
    def handler(m: Message) -> None:
        threads.append(threading.get_ident())
        raise Reject("no")

    runner = Runner(handler)
    result = _result(runner.run(message()))
    assert result.outcome is Outcome.PARKED
    assert threads == [threading.get_ident()]
    assert runner.pool.calls == 1


def test_a_deferred_handler_gives_a_deferred_that_fires_once_it_is_done() -> None:
    """A pending Deferred leaves the result pending; its failure then retries the message."""
    pending: Deferred[None] = Deferred()
    d = Runner(lambda m: pending).run(message())
    assert isinstance(d, Deferred)
    assert not d.called
    pending.errback(RuntimeError("late failure"))
    result = _fired(d)
    assert result.outcome is Outcome.RETRIED
    assert result.reason == "RuntimeError: late failure"


def test_an_already_fired_deferred_still_gives_a_deferred() -> None:
    """A Deferred-returning handler gives a Deferred even when its own has fired."""
    from twisted.internet.defer import succeed

    assert _fired(Runner(lambda m: succeed(None)).run(message())).outcome is Outcome.ACKED


def test_a_coroutine_handler_gives_a_deferred() -> None:
    """An async handler is awaited by the real invoker; the result follows its end."""
    gate: Deferred[None] = Deferred()

    async def handler(m: Message) -> None:
        await gate
        raise Reject("after the await")

    d = Runner(handler).run(message())
    assert isinstance(d, Deferred)
    assert not d.called
    gate.callback(None)
    assert _fired(d).outcome is Outcome.PARKED


def test_the_handler_timeout_runs_on_the_runner_s_clock() -> None:
    """Moving the clock past --handler-timeout cancels the handler and retries its message."""
    pending: Deferred[None] = Deferred()
    runner = Runner(lambda m: pending, handler_timeout=30)
    d = runner.run(message())
    runner.clock.advance(29)
    assert isinstance(d, Deferred)
    assert not d.called
    runner.clock.advance(1)
    result = _fired(d)
    assert result.timed_out
    assert result.reason == "HandlerTimeout: cancelled after 30s (--handler-timeout)"
    assert result.outcome is Outcome.RETRIED
    assert runner.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_pytest_twisted_awaits_a_handler_on_the_real_reactor() -> None:
    """A handler waiting on the reactor's own timers is awaited like any Deferred."""
    from twisted.internet import reactor

    async def handler(m: Message) -> None:
        await task.deferLater(reactor, 0.01, lambda: None)

    pending = Runner(handler).run(message())
    assert isinstance(pending, Deferred)
    result = await pending
    assert result.outcome is Outcome.ACKED


@pytest.mark.parametrize("kind", ["plain", "blocking"])
def test_settings_change_the_rules(kind: str) -> None:
    """with_settings gives a runner on the same handler with other options (here a 1 s delay)."""

    def failing(m: Message) -> None:
        raise RuntimeError("x")

    handler = consumer_svc.blocking(failing) if kind == "blocking" else failing
    result = _result(Runner(handler).with_settings(retry_delay=1.0).run(message()))
    assert result.retried is not None
    assert result.retried.delay == 1
