"""Tests for examples/tasks.py: a template for testing your own handlers.

Run them with ``pytest examples/test_tasks.py`` (consumer_svc's own suite does, in
tests/broker/test_examples.py). The unit tests need no broker: `consumer_svc.testing.Runner`
runs each handler through the service's real rules. The last test runs ``twistd consumer`` on a
throwaway RabbitMQ node from consumer_svc's pytest plugin (the ``rabbitmq_url`` fixture).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika
import pytest
import pytest_twisted

from consumer_svc.testing import Outcome, Result, Runner, message
from examples import tasks

# -- plain and @blocking handlers: the result is there when run() returns


def test_a_task_is_acked() -> None:
    """A JSON task is handled and its message acked."""
    result = Runner(tasks.handle_json).run(message(json.dumps({"task": "resize"})))
    assert isinstance(result, Result)
    assert result.outcome is Outcome.ACKED


def test_a_body_that_is_not_json_is_parked_at_once() -> None:
    """A body that is not JSON can never be handled: parked, no retries."""
    result = Runner(tasks.handle_json, queue="task_queue").run(message(b"{oops"))
    assert isinstance(result, Result)
    assert result.outcome is Outcome.PARKED
    assert result.parked is not None
    assert result.parked.queue == "task_queue.dead"
    assert result.parked.reason.startswith("UndecodableBody:")


def test_json_without_a_task_is_parked_with_the_reason() -> None:
    """The handler's Reject names what is missing, and that reason is kept with the message."""
    result = Runner(tasks.handle_json).run(message(json.dumps([1, 2])))
    assert isinstance(result, Result)
    assert result.outcome is Outcome.PARKED
    assert result.reason == "Reject: no 'task' in [1, 2]"


def test_the_blocking_handler_runs_in_the_test_s_thread() -> None:
    """@blocking handlers run synchronously here: no thread pool, no reactor."""
    result = Runner(tasks.handle_blocking).run(message(b"no dots, no sleep"))
    assert isinstance(result, Result)
    assert result.outcome is Outcome.ACKED


# -- Deferred and coroutine handlers: run() gives a Deferred, pytest-twisted awaits it


@pytest_twisted.ensureDeferred
async def test_the_deferred_handler_is_acked_once_its_work_is_done() -> None:
    """handle() works 0.1 s per dot on the reactor; the message is acked after."""
    result = await Runner(tasks.handle).run(message(b"work.."))  # type: ignore[misc]
    assert result.outcome is Outcome.ACKED


@pytest_twisted.ensureDeferred
async def test_the_coroutine_handler_is_acked() -> None:
    """handle_async awaits the reactor, then its message is acked."""
    result = await Runner(tasks.handle_async).run(message(b"job"))  # type: ignore[misc]
    assert result.outcome is Outcome.ACKED


@pytest_twisted.ensureDeferred
async def test_work_past_the_handler_timeout_is_cancelled_and_retried() -> None:
    """--handler-timeout runs on the runner's clock: moving it cancels the 5 s of work at once."""
    runner = Runner(tasks.handle, handler_timeout=2, retry_delay=10)
    pending = runner.run(message(b"." * 50))
    runner.clock.advance(2)
    result = await pending  # type: ignore[misc]
    assert result.timed_out
    assert result.outcome is Outcome.RETRIED
    assert result.retried is not None
    assert result.retried.delay == 10


# -- against a real broker, with the service itself


def _queue_counts(url: str, queue: str) -> tuple[int, int]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        frame = connection.channel().queue_declare(queue, passive=True)
        return frame.method.message_count, frame.method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return -1, -1  # not declared yet
    finally:
        if connection.is_open:
            connection.close()


def _wait_for(what: str, check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.2)


def test_the_service_handles_and_parks_on_a_real_broker(rabbitmq_url: str) -> None:
    """twistd consumer acks a task and parks a body that is not JSON, on a throwaway node."""
    queue = f"example-{uuid.uuid4().hex[:8]}"
    twistd = shutil.which("twistd", path=str(Path(sys.executable).parent)) or "twistd"
    argv = ["-n", "--pidfile=", "consumer", "--url", rabbitmq_url, "--queue", queue]
    # examples.tasks lives in this checkout, not in the service's virtualenv: say where.
    checkout = Path(__file__).resolve().parent.parent
    argv += ["--handler-path", str(checkout), "--handler", "examples.tasks:handle_json"]
    service = subprocess.Popen(
        [twistd, *argv],
        cwd=checkout,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for("the service to consume", lambda: _queue_counts(rabbitmq_url, queue)[1] == 1)
        connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
        channel = connection.channel()
        channel.confirm_delivery()
        for body in (json.dumps({"task": "resize"}).encode(), b"{oops"):
            channel.basic_publish("", queue, body, mandatory=True)
        connection.close()
        _wait_for("the queue to empty", lambda: _queue_counts(rabbitmq_url, queue) == (0, 1))
        _wait_for(
            "one parked message", lambda: _queue_counts(rabbitmq_url, f"{queue}.dead")[0] == 1
        )
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
