"""What happens to a message whose handler failed: retry later, or park it for a person.

Pure functions of the failure, the retries so far and the settings; the
consumer carries the decisions out with confirmed publishes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import CancelledError

from ._errors import Reject, Retry

#: Header names: ours, so not "x-" (RabbitMQ 4 drops client-set x- headers).
RETRIES = "consumer-svc-retries"
FAILURE = "consumer-svc-failure"
ATTEMPTS = "consumer-svc-attempts"
FAILED_AT = "consumer-svc-failed-at"
ORIGINAL_EXCHANGE = "consumer-svc-original-exchange"
ORIGINAL_ROUTING_KEY = "consumer-svc-original-routing-key"
QUEUE = "consumer-svc-queue"
PREFIX = "consumer-svc-"

#: No retry waits longer than this, whatever the schedule says.
DELAY_CAP = 3600.0


class Action(enum.Enum):
    RETRY = "retry"
    DEAD_LETTER = "dead-letter"


@dataclass(frozen=True)
class Decision:
    """Retry after ``delay`` seconds, or dead-letter; ``reason`` says why, in one line."""

    action: Action
    reason: str
    delay: float = 0.0


def describe_failure(error: BaseException, *, timeout: float | None = None) -> str:
    if isinstance(error, CancelledError) and timeout is not None:
        return f"HandlerTimeout: cancelled after {timeout:g}s (--handler-timeout)"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` retries after the first attempt, waiting ``delay``, then twice, four times as long ... (capped)."""

    max_retries: int = 5
    delay: float = 5.0

    def schedule(self, retry: int) -> float:
        """The wait before retry number ``retry`` (from 1)."""
        return min(DELAY_CAP, self.delay * 2.0 ** min(retry - 1, 32))

    def decide(self, error: BaseException, retries: int, reason: str) -> Decision:
        """What to do with a message that failed after ``retries`` earlier retries."""
        if isinstance(error, Reject):
            return Decision(Action.DEAD_LETTER, reason)
        if retries >= self.max_retries:
            attempts = retries + 1
            return Decision(Action.DEAD_LETTER, f"{reason} (gave up after {attempts} attempts)")
        if isinstance(error, Retry) and error.delay is not None:
            return Decision(Action.RETRY, reason, min(DELAY_CAP, error.delay))
        return Decision(Action.RETRY, reason, self.schedule(retries + 1))


def retries_of(headers: Mapping[str, Any] | None) -> int:
    """The retry count a message carries (0 for a first delivery or a garbled header)."""
    value = (headers or {}).get(RETRIES, 0)
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def retry_queue(queue: str, delay: float) -> tuple[str, dict[str, Any]]:
    """The queue that holds retries of ``queue`` for ``delay`` seconds, and its arguments.

    One queue per delay: a queue-wide TTL expires every message on time,
    where per-message TTLs would wait behind a longer one at the head.
    """
    ms = max(1, round(delay * 1000))
    return f"{queue}.retry.{ms}", {
        "x-message-ttl": ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
    }


def retry_headers(headers: Mapping[str, Any] | None, retries: int) -> dict[str, Any]:
    copy = dict(headers or {})
    copy[RETRIES] = retries
    return copy


def dead_letter_headers(
    headers: Mapping[str, Any] | None,
    *,
    reason: str,
    attempts: int,
    exchange: str,
    routing_key: str,
    queue: str,
    now: datetime | None = None,
) -> dict[str, Any]:
    when = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    copy = dict(headers or {})
    copy.pop(RETRIES, None)
    copy.update(
        {
            FAILURE: reason,
            ATTEMPTS: attempts,
            FAILED_AT: when,
            ORIGINAL_EXCHANGE: exchange,
            ORIGINAL_ROUTING_KEY: routing_key,
            QUEUE: queue,
        }
    )
    return copy
