"""The retry policy and its headers are pure functions: tested by value."""

from datetime import datetime, timezone

import pytest
from twisted.internet.defer import CancelledError

from consumer_svc import Reject, Retry, UndecodableBody
from consumer_svc._retry import (
    LADDER,
    Action,
    RetryPolicy,
    dead_letter_arguments,
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
        ({"consumer-svc-retries": b"3"}, 0),
        ({"consumer-svc-retries": -2}, 0),
        ({"consumer-svc-retries": 2.5}, 0),
        ({"consumer-svc-retries": True}, 0),
        ({"consumer-svc-retries": None}, 0),
        ({"consumer-svc-retries": [1]}, 0),
        ({"consumer-svc-retries": 2**63 - 1}, 1000),
    ],
)
def test_the_retry_count_survives_garbage(headers: dict[str, object] | None, count: int) -> None:
    """A missing or garbled count is a first delivery; an absurd one is capped, so it parks."""
    assert retries_of(headers) == count


def test_a_forged_huge_retry_count_parks_with_an_encodable_attempt_count() -> None:
    """int64 max in the header gives up at once, and the attempts written stay small."""
    retries = retries_of({"consumer-svc-retries": 2**63 - 1})
    decision = RetryPolicy(max_retries=5).decide(ValueError("x"), retries, "ValueError: x")
    assert decision.action is Action.DEAD_LETTER
    assert retries + 1 < 2**31


@pytest.mark.parametrize(
    ("wanted", "rung"),
    [
        (0, 1),
        (0.25, 1),
        (1, 1),
        (1.5, 2),
        (3, 5),
        (5, 5),
        (6, 10),
        (80, 80),
        (81, 160),
        (3000, 3600),
        (10**6, 3600),
    ],
)
def test_a_delay_is_rounded_up_to_the_ladder(wanted: float, rung: int) -> None:
    """Every delay lands on one of a fixed set of rungs, within 1x to 2x + 1 s (capped at an hour)."""
    name, arguments = retry_queue("jobs", wanted)
    assert name == f"jobs.retry.{rung}s"
    assert arguments["x-message-ttl"] == rung * 1000
    assert min(wanted, 3600) <= rung <= max(2 * wanted + 1, 1)


def test_however_many_delays_handlers_ask_for_the_retry_queues_are_few() -> None:
    """A thousand distinct delays map to no more than the ladder's thirteen queues."""
    names = {retry_queue("jobs", delay / 7)[0] for delay in range(0, 7 * 4000, 7)}
    assert len(names) == len(LADDER) == 13


def test_a_retry_queue_dead_letters_at_least_once_and_expires_when_unused() -> None:
    """A quorum queue with a queue-wide TTL, at-least-once dead-lettering back to the work queue, and x-expires."""
    assert retry_queue("jobs", 20) == (
        "jobs.retry.20s",
        {
            "x-queue-type": "quorum",
            "x-message-ttl": 20000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "jobs",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-expires": (20 + 24 * 3600) * 1000,
        },
    )


def test_the_dead_letter_queue_is_a_quorum_queue_when_the_work_queue_is_one() -> None:
    """A classic dead-letter queue would pin parking to one node of a cluster."""
    assert dead_letter_arguments({"x-queue-type": "quorum", "x-max-length": 5}) == {
        "x-queue-type": "quorum"
    }
    assert dead_letter_arguments({}) == {}


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
