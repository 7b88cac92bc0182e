"""The retry policy and its headers are pure functions: tested by value."""

from datetime import datetime, timezone

import pytest
from twisted.internet.defer import CancelledError

from consumer_svc import Reject, Retry, UndecodableBody
from consumer_svc._retry import (
    Action,
    RetryPolicy,
    dead_letter_headers,
    describe_failure,
    retries_of,
    retry_queue,
)


def test_the_schedule_doubles_from_the_retry_delay_and_is_capped() -> None:
    """Waits are delay, 2x, 4x ... and never over an hour."""
    policy = RetryPolicy(max_retries=5, delay=5.0)
    assert [policy.schedule(n) for n in range(1, 6)] == [5.0, 10.0, 20.0, 40.0, 80.0]
    assert policy.schedule(1000) == 3600.0


@pytest.mark.parametrize(
    ("error", "retries", "action", "delay"),
    [
        (RuntimeError("db down"), 0, Action.RETRY, 5.0),
        (RuntimeError("db down"), 2, Action.RETRY, 20.0),
        (RuntimeError("db down"), 5, Action.DEAD_LETTER, 0.0),
        (Reject("bad"), 0, Action.DEAD_LETTER, 0.0),
        (UndecodableBody("not json"), 0, Action.DEAD_LETTER, 0.0),
        (Retry("later", delay=42), 0, Action.RETRY, 42.0),
        (Retry("later", delay=42), 5, Action.DEAD_LETTER, 0.0),
        (Retry("soon"), 1, Action.RETRY, 10.0),
    ],
)
def test_decisions(error: Exception, retries: int, action: Action, delay: float) -> None:
    """Permanent failures park at once; others retry on schedule until max_retries."""
    decision = RetryPolicy(max_retries=5, delay=5.0).decide(error, retries, "why")
    assert (decision.action, decision.delay) == (action, delay)


def test_giving_up_says_how_often_it_tried() -> None:
    """The reason of a message that ran out of retries counts the attempts."""
    decision = RetryPolicy(max_retries=2).decide(ValueError("x"), 2, "ValueError: x")
    assert decision.reason == "ValueError: x (gave up after 3 attempts)"


def test_failures_are_described_in_one_line() -> None:
    """Exception type and first line; a handler timeout is named as such."""
    assert describe_failure(ValueError("bad\nmore lines")) == "ValueError: bad"
    assert describe_failure(KeyError()) == "KeyError"
    assert (
        describe_failure(CancelledError(), timeout=30)
        == "HandlerTimeout: cancelled after 30s (--handler-timeout)"
    )


@pytest.mark.parametrize(
    ("headers", "count"),
    [
        (None, 0),
        ({}, 0),
        ({"consumer-svc-retries": 3}, 3),
        ({"consumer-svc-retries": "x"}, 0),
        ({"consumer-svc-retries": -2}, 0),
    ],
)
def test_the_retry_count_survives_garbage(headers: dict[str, object] | None, count: int) -> None:
    """A missing or garbled count is a first delivery."""
    assert retries_of(headers) == count


def test_each_delay_has_its_own_retry_queue() -> None:
    """A queue-wide TTL, dead-lettering back to the work queue through the default exchange."""
    assert retry_queue("jobs", 0.25) == (
        "jobs.retry.250",
        {"x-message-ttl": 250, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "jobs"},
    )


def test_dead_letter_headers_keep_the_original_and_say_why() -> None:
    """The copy keeps its own headers and gains ours; the retry count goes."""
    headers = dead_letter_headers(
        {"tenant": "a", "consumer-svc-retries": 5},
        reason="ValueError: x",
        attempts=6,
        exchange="orders",
        routing_key="order.created",
        queue="jobs",
        now=datetime(2026, 11, 23, 8, 0, 0, tzinfo=timezone.utc),
    )
    assert headers == {
        "tenant": "a",
        "consumer-svc-failure": "ValueError: x",
        "consumer-svc-attempts": 6,
        "consumer-svc-failed-at": "2026-11-23T08:00:00Z",
        "consumer-svc-original-exchange": "orders",
        "consumer-svc-original-routing-key": "order.created",
        "consumer-svc-queue": "jobs",
    }


def test_a_retry_delay_must_be_sane() -> None:
    """Retry(delay=-1) is a programming error, caught where it is made."""
    with pytest.raises(ValueError, match="Retry delay"):
        Retry("x", delay=-1)
